"""The seed document's behaviour where it differs from its intent, restated to be tested.

Only the quirks live here; ``reference.py`` implements the intended semantics. Each function
reproduces what the seed's code literally does (``../shared/seed/lora_seed.txt``).
"""

from __future__ import annotations

from torch import nn


def linear_param_scale(rank: int, alpha: float) -> float:
    """The seed's ``linear_param`` passes ``alpha=1`` to ``LoRA`` whatever ``alpha`` it gets,
    so its scale is ``1 / rank``."""
    del alpha
    return 1 / rank


def freeze_model(model: nn.Module, freeze: bool = True) -> None:
    """The seed sets ``requires_grad = freeze``: ``freeze=True`` makes everything trainable."""
    for p in model.parameters():
        p.requires_grad = freeze


def factor_shapes(layer: nn.Linear, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The seed reads ``dim_in, dim_out = layer.weight.shape`` — (out, in) for ``nn.Linear``,
    so its ``dim_in`` is the layer's *output* size. Its factors: ``lora_a: (rank, dim_out)`` and
    ``lora_b: (dim_in, rank)``, i.e. (rank, in) and (out, rank) — right, with swapped names."""
    dim_in, dim_out = layer.weight.shape
    return (rank, dim_out), (dim_in, rank)
