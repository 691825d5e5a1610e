"""Where the seed's literal code differs from its intent, jax_lora follows the intent.

Each test runs jax_lora against ``reference.py`` (the intended semantics) on the same weights
and factors, and checks that the seed's literal behaviour (``seed_literal.py``) would differ.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import jax_lora
from torch_parity import reference, seed_literal
from torch_parity.comparisons import LINEARS, _data, _Pair

TOL = 1e-5  # fp32 forward, relative to max|torch|


def _close(got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), want.detach().numpy().astype(np.float64)
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


def test_alpha_honoured_not_seed_scale():
    rank, alpha = 4, 16.0
    pair = _Pair("seed", rank=rank, alpha=alpha)
    x, _ = _data()
    out_j = pair.wrapped.apply({"params": pair.params, "lora": pair.lora}, x)
    with torch.no_grad():
        out_ref = pair.torch(torch.from_numpy(x))
        for p in reference.lora_layers(pair.torch).values():
            p.scale = seed_literal.linear_param_scale(rank, alpha)  # the seed's 1 / rank
        out_seed = pair.torch(torch.from_numpy(x))
    assert pair.config.scale == alpha / rank == 4.0
    _close(out_j, out_ref)
    assert np.abs(np.asarray(out_j) - out_seed.numpy()).max() > 1e-2


def test_freeze_trains_factors_only_not_the_seed_inversion():
    pair = _Pair("seed")  # reference.freeze_model(freeze=True) already applied
    v = {"params": pair.params, "lora": pair.lora}
    mask = jax_lora.trainable_mask(v)
    trainable_j = {
        "/".join(str(k.key) for k in path)
        for path, m in jax.tree_util.tree_flatten_with_path(mask)[0]
        if m
    }
    trainable_t = {n for n, p in pair.torch.named_parameters() if p.requires_grad}
    assert trainable_t == {f"{n}.parametrizations.weight.0.lora_{f}" for n in LINEARS for f in "ab"}
    assert trainable_j == {f"lora/{n}/{f}" for n in LINEARS for f in "ab"}
    tx = jax_lora.optimizer(optax.sgd(1.0))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, v), tx.init(v), v)
    assert not any(np.asarray(u).any() for u in jax.tree.leaves(updates["params"]))
    assert all(np.asarray(u).all() for u in jax.tree.leaves(updates["lora"]))
    seed_literal.freeze_model(pair.torch, freeze=True)  # the seed: everything trainable
    assert all(p.requires_grad for p in pair.torch.parameters())


def test_factor_shapes_follow_in_out_features_not_seed_names():
    pair = _Pair("seed", rank=2)
    lora = jax_lora.init_lora(pair.wrapped, jax.random.key(0), {"params": pair.params}, _data()[0])
    for n in LINEARS:
        layer = pair.torch.get_submodule(n)
        p = reference.lora_layers(pair.torch)[n]
        a_shape, b_shape = seed_literal.factor_shapes(layer, rank=2)
        assert (tuple(p.lora_a.shape), tuple(p.lora_b.shape)) == (a_shape, b_shape)
        # jax_lora: a: (in, r), b: (r, out) -- the transposes, named after nn.Linear
        assert lora[n]["a"].shape == (layer.in_features, 2)
        assert lora[n]["b"].shape == (2, layer.out_features)
        dim_in, dim_out = layer.weight.shape  # the seed's names: (out, in), swapped
        if dim_in != dim_out:
            assert (dim_in, dim_out) != (layer.in_features, layer.out_features)


@pytest.mark.parametrize("merge", [False, True])
def test_disable_and_remove_match_reference(merge):
    pair = _Pair("seed", rank=2, alpha=2.0)
    x, _ = _data()
    v = {"params": pair.params, "lora": pair.lora}
    on_j = np.asarray(pair.wrapped.apply(v, x))
    with jax_lora.disabled():
        off_j = np.asarray(pair.wrapped.apply(v, x))
    removed_j = pair.flax.apply(
        {"params": jax_lora.merge(v, pair.config) if merge else pair.params}, x
    )
    with torch.no_grad():
        on_t = pair.torch(torch.from_numpy(x))
        reference.enable_disable_lora(pair.torch, False)
        off_t = pair.torch(torch.from_numpy(x))
        reference.enable_disable_lora(pair.torch, True)
        removed_t = reference.remove_lora(pair.torch, merge=merge)(torch.from_numpy(x))
    assert np.abs(on_j - off_j).max() > 1e-3
    _close(on_j, on_t)
    _close(off_j, off_t)
    _close(removed_j, removed_t)
    assert not any("lora" in n for n, _ in pair.torch.named_parameters())
