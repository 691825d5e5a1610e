"""Explicit, shape-checked conversions between torch/PEFT and Flax/jax_lora layouts.

| torch / PEFT                      | Flax / jax_lora              |
|-----------------------------------|------------------------------|
| ``Linear.weight``  (out, in)      | ``kernel`` (in..., out...)   |
| ``lora_A.weight``  (r, in)        | ``a``      (in..., r)        |
| ``lora_B.weight``  (out, r)       | ``b``      (r, out...)       |

``in...``/``out...`` are the kernel's input/output axes (e.g. a multi-head projection kernel
``(d, heads, head_dim)`` is a ``Linear(d, heads * head_dim)``). The factor converters are the
library's own (``jax_lora.peft``), the ones `export_peft`/`import_peft` use.
"""

from __future__ import annotations

import math

import numpy as np

from jax_lora.peft import a_from_peft as a_from_peft
from jax_lora.peft import a_to_peft as a_to_peft
from jax_lora.peft import b_from_peft as b_from_peft
from jax_lora.peft import b_to_peft as b_to_peft

__all__ = [
    "a_from_peft",
    "a_to_peft",
    "b_from_peft",
    "b_to_peft",
    "kernel_from_torch",
    "kernel_to_torch",
]


def kernel_from_torch(weight, in_shape, out_shape) -> np.ndarray:
    """``(out, in)`` -> ``(in..., out...)``."""
    w = np.asarray(weight)
    want = (math.prod(out_shape), math.prod(in_shape))
    if tuple(w.shape) != want:
        raise ValueError(f"Linear.weight: expected shape {want}, got {tuple(w.shape)}")
    return np.ascontiguousarray(w.T.reshape(*in_shape, *out_shape))


def kernel_to_torch(kernel, n_in: int = 1) -> np.ndarray:
    """``(in..., out...)`` (first ``n_in`` axes are inputs) -> ``(out, in)``."""
    k = np.asarray(kernel)
    fan_in = math.prod(k.shape[:n_in])
    return np.ascontiguousarray(k.reshape(fan_in, -1).T)
