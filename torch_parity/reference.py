"""The seed document's LoRA design in PyTorch, with its intended semantics.

LoRA is a ``torch.nn.utils.parametrize`` weight parametrization of each targeted ``nn.Linear``:
the layer's ``weight`` (out, in) is computed as ``W + scale * B @ A`` with ``A: (r, in)``
(``N(0, 1)`` at init, as in the seed) and ``B: (out, r)`` (zeros). Unlike the seed's literal code
(see ``seed_literal.py``): ``alpha`` is honoured (``scale = alpha / r``), ``freeze_model(freeze=True)``
freezes, and shapes are named after ``nn.Linear`` (``in_features``, ``out_features``).
"""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.nn.utils import parametrize


class LoRAParametrization(nn.Module):
    """``weight -> weight + scale * lora_b @ lora_a``; ``lora_a: (r, in)``, ``lora_b: (out, r)``."""

    def __init__(self, in_features: int, out_features: int, rank: int = 1, alpha: float = 1.0):
        super().__init__()
        self.lora_a = nn.Parameter(torch.randn(rank, in_features))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + (self.lora_b @ self.lora_a) * self.scale


def _targets(model: nn.Module, targets: str | None):
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (targets is None or re.fullmatch(targets, name)):
            yield name, module


def apply_lora(
    model: nn.Module, rank: int = 1, alpha: float = 1.0, targets: str | None = None
) -> nn.Module:
    """Parametrize every ``nn.Linear`` whose name fully matches ``targets`` (all if ``None``)."""
    for _, layer in list(_targets(model, targets)):
        parametrize.register_parametrization(
            layer, "weight", LoRAParametrization(layer.in_features, layer.out_features, rank, alpha)
        )
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRAParametrization]:
    """``{linear name: its LoRA parametrization}``."""
    return {
        name: m.parametrizations["weight"][0]
        for name, m in model.named_modules()
        if parametrize.is_parametrized(m, "weight")
    }


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Drop the parametrizations; ``merge=True`` keeps ``W + scale * B @ A`` as the weight."""
    for _, layer in list(model.named_modules()):
        if parametrize.is_parametrized(layer, "weight"):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=merge)
    return model


def enable_disable_lora(model: nn.Module, enabled: bool = True) -> None:
    for p in lora_layers(model).values():
        p.enabled = enabled


def freeze_model(model: nn.Module, freeze: bool = True) -> None:
    """Freeze (``requires_grad=False``) every parameter that is not a LoRA factor."""
    for name, p in model.named_parameters():
        if not (name.endswith(".lora_a") or name.endswith(".lora_b")):
            p.requires_grad = not freeze
