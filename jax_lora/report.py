"""Count trainable vs total parameters, like PEFT's ``print_trainable_parameters``."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.core import meta

from . import quant
from .optim import trainable_mask


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts: ``trainable`` (LoRA factors), ``total`` (base + LoRA), each
    quantized kernel counted as the weights it stands for (its ``shape``); ``base_bytes``: the
    bytes the frozen params take (a quantized kernel's codes and scales), not printed."""

    trainable: int
    total: int
    base_bytes: int = 0

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
            f"trainable%: {self.percent:.4f}"
        )


def param_report(variables: Any, *, also_train: str | Sequence[str] | None = None) -> ParamReport:
    """Trainable/total parameter counts of ``{"params": ..., "lora": ...}``.

    Only the ``params`` and ``lora`` collections count (not e.g. ``batch_stats``). An NNX model
    (or its ``nnx.State``) counts its ``nnx.Param``s, of which the ``nnx.LoRAParam`` factors
    are the trainable ones. ``also_train`` adds params as in `trainable_mask`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jax_lora
    >>> model = jax_lora.wrap(nn.Dense(16), jax_lora.LoraConfig(rank=4))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> print(jax_lora.param_report(variables))  # a: (8, 4), b: (4, 16); kernel (8, 16), bias (16,)
    trainable params: 96 || all params: 240 || trainable%: 40.0000
    """
    if isinstance(variables, nnx.Module):
        variables = nnx.state(variables, nnx.Param)
    if isinstance(variables, nnx.State):
        counted = nnx.filter_state(variables, nnx.Param)
    else:
        counted = {k: v for k, v in variables.items() if k in ("params", "lora")}
    mask = trainable_mask(counted, also_train=also_train)
    if isinstance(counted, nnx.State):  # one flag per Variable
        leaves = [
            v.get_value()
            for v in jax.tree.leaves(counted, is_leaf=lambda x: isinstance(x, nnx.Variable))
        ]
        flags = [bool(m) for m in jax.tree.leaves(mask)]
    else:  # one flag per array: a QArray is trainable if any of its arrays is (never)
        counted = meta.unbox(counted)
        treedef = jax.tree.structure(counted, is_leaf=quant.is_quantized)
        leaves = treedef.flatten_up_to(counted)
        flags = [any(jax.tree.leaves(m)) for m in treedef.flatten_up_to(meta.unbox(mask))]
    sizes = [_count(x) for x in leaves]
    trainable = sum(s for s, m in zip(sizes, flags, strict=True) if m)
    base_bytes = sum(quant.nbytes(x) for x, m in zip(leaves, flags, strict=True) if not m)
    return ParamReport(trainable=trainable, total=sum(sizes), base_bytes=base_bytes)


def _count(x: Any) -> int:
    """Weights in ``x``: a quantized kernel counts its logical shape, not its codes."""
    return math.prod(x.shape) if quant.is_quantized(x) else int(np.size(x))
