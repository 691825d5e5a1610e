"""Count trainable vs total parameters, like PEFT's ``print_trainable_parameters``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from .optim import trainable_mask


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts: ``trainable`` (LoRA factors), ``total`` (base + LoRA)."""

    trainable: int
    total: int

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
    sizes = [int(np.size(x)) for x in jax.tree.leaves(counted)]
    total = sum(sizes)
    trainable = sum(s for s, m in zip(sizes, jax.tree.leaves(mask), strict=True) if m)
    return ParamReport(trainable=trainable, total=total)
