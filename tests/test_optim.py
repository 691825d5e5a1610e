import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import MLP

import jax_lora
from jax_lora import LoraConfig


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax's own transforms mix int step counts with floats
    with jax.numpy_dtype_promotion("standard"):
        yield


def _vars():
    x = jnp.ones((2, 16))
    return jax_lora.wrap(MLP(), LoraConfig(rank=2)).init(jax.random.key(0), x)


def _ones_like(tree):
    return jax.tree.map(jnp.ones_like, tree)


@pytest.mark.parametrize(
    "tx, n_moments",
    [
        (optax.adam(1e-3), 2),
        (optax.sgd(1e-2, momentum=0.9), 1),
        (optax.adamw(1e-3), 2),
        (optax.sgd(0.1), 0),
    ],
)
def test_state_only_for_factors(tx, n_moments):
    v = _vars()
    state = jax_lora.optimizer(tx).init(v)
    n_lora = sum(t.size for t in jax.tree.leaves(v["lora"]))
    floats = [t for t in jax.tree.leaves(state) if jnp.issubdtype(t.dtype, jnp.floating)]
    assert sum(t.size for t in floats) == n_moments * n_lora


def test_frozen_updates_exactly_zero_even_with_weight_decay():
    v = _vars()
    tx = jax_lora.optimizer(optax.adamw(1e-1, weight_decay=0.5))
    updates, _ = tx.update(_ones_like(v), tx.init(v), v)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates["params"]))
    assert all(np.asarray(u).all() for u in jax.tree.leaves(updates["lora"]))


def test_optax_masked_is_the_classic_bug():
    """What `optimizer` avoids: `optax.masked` lets frozen gradients through unchanged."""
    v = _vars()
    mask = jax_lora.trainable_mask(v)
    naive = optax.masked(optax.adam(1e-3), mask)
    updates, _ = naive.update(_ones_like(v), naive.init(v), v)
    assert all(np.asarray(u).all() for u in jax.tree.leaves(updates["params"]))


def test_also_train_adds_head():
    v = _vars()
    mask = jax_lora.trainable_mask(v, also_train=r"head/.*")
    assert mask["params"]["head"] == {"kernel": True, "bias": True}
    assert mask["params"]["fc1"] == {"kernel": False, "bias": False}
    tx = jax_lora.optimizer(optax.sgd(1.0), also_train="head/kernel")
    updates, _ = tx.update(_ones_like(v), tx.init(v), v)
    assert np.asarray(updates["params"]["head"]["kernel"]).all()
    assert not np.asarray(updates["params"]["head"]["bias"]).any()


def test_param_report_counts():
    v = _vars()
    # MLP 16-16-16-4: kernels 256 + 256 + 64, biases 16 + 16 + 4
    base = 256 + 256 + 64 + 16 + 16 + 4
    lora = (16 * 2 + 2 * 16) * 2 + (16 * 2 + 2 * 4)
    rep = jax_lora.param_report(v)
    assert (rep.trainable, rep.total) == (lora, base + lora)
    assert rep.percent == pytest.approx(100 * lora / (base + lora))
    assert (
        str(rep)
        == f"trainable params: {lora:,} || all params: {base + lora:,} || trainable%: {100 * lora / (base + lora):.4f}"
    )
    assert jax_lora.param_report(v, also_train="head/.*").trainable == lora + 64 + 4
