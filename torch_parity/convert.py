"""Explicit, shape-checked conversions between torch/PEFT and Flax/jax_lora layouts.

| torch / PEFT                      | Flax / jax_lora              |
|-----------------------------------|------------------------------|
| ``Linear.weight``  (out, in)      | ``kernel`` (in..., out...)   |
| ``lora_A.weight``  (r, in)        | ``a``      (in..., r)        |
| ``lora_B.weight``  (out, r)       | ``b``      (r, out...)       |

``in...``/``out...`` are the kernel's input/output axes (e.g. a multi-head projection kernel
``(d, heads, head_dim)`` is a ``Linear(d, heads * head_dim)``).
"""

from __future__ import annotations

import math

import numpy as np


def _check(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")


def kernel_from_torch(weight, in_shape, out_shape) -> np.ndarray:
    """``(out, in)`` -> ``(in..., out...)``."""
    w = np.asarray(weight)
    _check("Linear.weight", w, (math.prod(out_shape), math.prod(in_shape)))
    return np.ascontiguousarray(w.T.reshape(*in_shape, *out_shape))


def kernel_to_torch(kernel, n_in: int = 1) -> np.ndarray:
    """``(in..., out...)`` (first ``n_in`` axes are inputs) -> ``(out, in)``."""
    k = np.asarray(kernel)
    fan_in = math.prod(k.shape[:n_in])
    return np.ascontiguousarray(k.reshape(fan_in, -1).T)


def a_from_peft(lora_a, in_shape) -> np.ndarray:
    """PEFT ``lora_A.weight (r, in)`` -> ``a (in..., r)``."""
    w = np.asarray(lora_a)
    _check("lora_A.weight", w, (w.shape[0], math.prod(in_shape)))
    return np.ascontiguousarray(w.T.reshape(*in_shape, w.shape[0]))


def a_to_peft(a) -> np.ndarray:
    """``a (in..., r)`` -> PEFT ``lora_A.weight (r, in)``."""
    a = np.asarray(a)
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)


def b_from_peft(lora_b, out_shape) -> np.ndarray:
    """PEFT ``lora_B.weight (out, r)`` -> ``b (r, out...)``."""
    w = np.asarray(lora_b)
    _check("lora_B.weight", w, (math.prod(out_shape), w.shape[1]))
    return np.ascontiguousarray(w.T.reshape(w.shape[1], *out_shape))


def b_to_peft(b) -> np.ndarray:
    """``b (r, out...)`` -> PEFT ``lora_B.weight (out, r)``."""
    b = np.asarray(b)
    return np.ascontiguousarray(b.reshape(b.shape[0], -1).T)
