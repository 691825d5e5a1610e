"""The seed's literal code vs its intent: each quirk shown to differ from reference.py."""

import pytest
import torch
from torch import nn

from torch_parity import reference, seed_literal


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def test_alpha_ignored_by_seed_but_honoured_by_reference():
    rank, alpha = 4, 16.0
    model = reference.apply_lora(_model(), rank=rank, alpha=alpha)
    assert reference.lora_layers(model)["0"].scale == alpha / rank == 4.0
    assert seed_literal.linear_param_scale(rank, alpha) == 0.25 != 4.0


def test_seed_freeze_is_inverted():
    model = reference.apply_lora(_model(), rank=2)
    seed_literal.freeze_model(model, freeze=True)
    assert all(p.requires_grad for p in model.parameters())  # the seed: nothing frozen
    reference.freeze_model(model, freeze=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.parametrizations.weight.0.lora_{f}" for i in (0, 2) for f in "ab"}
    reference.freeze_model(model, freeze=False)
    assert all(p.requires_grad for p in model.parameters())


def test_seed_dim_names_swapped():
    layer = nn.Linear(5, 7)  # in=5, out=7; weight (7, 5)
    a_shape, b_shape = seed_literal.factor_shapes(layer, rank=2)
    assert (a_shape, b_shape) == ((2, 5), (7, 2))  # correct shapes...
    dim_in, dim_out = layer.weight.shape
    assert (dim_in, dim_out) == (7, 5) != (layer.in_features, layer.out_features)  # ...misnamed
    p = (
        reference.apply_lora(nn.Sequential(layer), rank=2)
        .get_submodule("0")
        .parametrizations["weight"][0]
    )
    assert tuple(p.lora_a.shape) == a_shape and tuple(p.lora_b.shape) == b_shape


@pytest.mark.parametrize("merge", [False, True])
def test_reference_remove_and_disable(merge):
    model = reference.apply_lora(_model(), rank=2, alpha=2.0)
    with torch.no_grad():
        for p in reference.lora_layers(model).values():
            p.lora_b.normal_()
    x = torch.randn(4, 5)
    with torch.no_grad():
        on = model(x)
        reference.enable_disable_lora(model, False)
        off = model(x)
        reference.enable_disable_lora(model, True)
        removed = reference.remove_lora(model, merge=merge)(x)
    assert (on - off).abs().max() > 1e-3
    torch.testing.assert_close(removed, on if merge else off, rtol=1e-6, atol=1e-6)
    assert not any("lora" in n for n, _ in model.named_parameters())
