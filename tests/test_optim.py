import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import MLP
from flax import linen as nn
from flax import nnx

import jax_lora
from jax_lora import LoraConfig


def _vars():
    x = jnp.ones((2, 16))
    return jax_lora.wrap(MLP(), LoraConfig(rank=2)).init(jax.random.key(0), x)


def _optax_update(tx, grads, state, params):
    """``tx.update`` with standard promotion for optax's internals only (adam's bias correction
    mixes a Python float with its int32 step count); our code runs under strict promotion."""
    with jax.numpy_dtype_promotion("standard"):
        return tx.update(grads, state, params)


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
    updates, _ = _optax_update(tx, _ones_like(v), tx.init(v), v)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates["params"]))
    assert all(np.asarray(u).all() for u in jax.tree.leaves(updates["lora"]))


def test_frozen_leaves_never_move_and_carry_no_state():
    """Several adamw steps (momentum, weight decay) on non-zero gradients: every frozen leaf is
    bit-identical afterwards and the optimizer state holds moments for the factors only."""
    v = _vars()
    tx = jax_lora.optimizer(optax.adamw(1e-1, weight_decay=0.5))
    state = tx.init(v)
    keys = iter(jax.random.split(jax.random.key(1), 100))
    params = v
    for _ in range(3):
        grads = jax.tree.map(lambda t: jax.random.normal(next(keys), t.shape, t.dtype), v)
        updates, state = _optax_update(tx, grads, state, params)
        params = optax.apply_updates(params, updates)
    jax.tree.map(np.testing.assert_array_equal, params["params"], v["params"])
    moved = jax.tree.map(lambda p, q: bool(np.abs(np.asarray(p - q)).min() > 0), params, v)
    assert all(jax.tree.leaves(moved["lora"]))
    n_lora = sum(t.size for t in jax.tree.leaves(v["lora"]))
    floats = [t for t in jax.tree.leaves(state) if jnp.issubdtype(t.dtype, jnp.floating)]
    assert sum(t.size for t in floats) == 2 * n_lora  # adam's mu and nu of a, b only


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


class _Heads(nn.Module):
    """A frozen ``Dense`` named ``lora_a`` and two heads whose names share a prefix."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="lora_a")(x)
        return nn.Dense(3, name="head")(x) + nn.Dense(3, name="head2")(x)


def _heads_vars():
    cfg = LoraConfig(rank=2, targets="head|head2")
    return jax_lora.wrap(_Heads(), cfg).init(jax.random.key(0), jnp.ones((1, 4)))


def test_linen_mask_is_the_top_level_lora_collection_only():
    v = _heads_vars()
    mask = jax_lora.trainable_mask(v)
    assert mask["lora"] == {n: {"a": True, "b": True} for n in ("head", "head2")}
    assert mask["params"]["lora_a"] == {"kernel": False, "bias": False}  # a layer's name
    nested = {"params": {"enc": {"lora": {"kernel": jnp.ones((2, 2))}}}, "lora": v["lora"]}
    assert jax_lora.trainable_mask(nested)["params"] == {"enc": {"lora": {"kernel": False}}}


def test_also_train_is_a_fullmatch():
    v = _heads_vars()
    mask = jax_lora.trainable_mask(v, also_train="head/kernel")
    assert mask["params"]["head"] == {"kernel": True, "bias": False}
    assert mask["params"]["head2"] == {"kernel": False, "bias": False}
    with pytest.raises(ValueError, match="`also_train` pattern 'head' matches no param"):
        jax_lora.trainable_mask(v, also_train="head")  # re.search would train head2/kernel


@pytest.mark.parametrize("pattern", ["head", "params/head/.*", "nope"])
def test_also_train_matching_nothing_raises_with_candidates(pattern):
    v = _heads_vars()
    with pytest.raises(ValueError) as e:
        jax_lora.trainable_mask(v, also_train=["head/bias", pattern])
    msg = str(e.value)
    assert f"`also_train` pattern {pattern!r} matches no param" in msg
    assert "head/kernel" in msg and "head2/bias" in msg and "lora_a/kernel" in msg
    with pytest.raises(ValueError, match="matches no param"):
        jax_lora.optimizer(optax.sgd(1.0), also_train=pattern).init(v)
    with pytest.raises(ValueError, match="matches no param"):
        jax_lora.param_report(v, also_train=pattern)


def test_not_a_variables_tree_raises():
    v = _heads_vars()
    with pytest.raises(ValueError, match="top-level 'lora' collection"):
        jax_lora.trainable_mask(v["params"])


class _NnxModel(nnx.Module):
    """An adapted ``fc``; a frozen sub-module named ``lora``; a frozen Param named ``lora_b``."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(4, 4, rngs=rngs)
        self.lora = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)
        self.head.lora_b = nnx.Param(jnp.ones((2,)))

    def __call__(self, x):
        return self.head(self.lora(self.fc(x))) + self.head.lora_b[...]


def _nnx_state():
    model = jax_lora.wrap(_NnxModel(nnx.Rngs(0)), LoraConfig(rank=2, targets="fc"))
    return nnx.state(model, nnx.Param)


def _flat(tree):
    """``{"fc/lora_a": bool, ...}``: each leaf (or Variable) of an NNX tree as a bool."""
    flat = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
    value = lambda v: v.get_value() if isinstance(v, nnx.Variable) else v  # noqa: E731
    return {
        "/".join(str(k.key) for k in path): bool(np.asarray(value(m)).any()) for path, m in flat
    }


def test_nnx_mask_by_variable_type():
    state = _nnx_state()
    flat = _flat(jax_lora.trainable_mask(state))
    assert {k for k, m in flat.items() if m} == {"fc/lora_a", "fc/lora_b"}
    assert len(flat) == 9  # fc: kernel bias a b; lora: kernel bias; head: kernel bias lora_b
    tx = jax_lora.optimizer(optax.sgd(1.0))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, state), tx.init(state), state)
    assert {k for k, u in _flat(updates).items() if u} == {"fc/lora_a", "fc/lora_b"}


def test_nnx_also_train():
    state = _nnx_state()
    flat = _flat(jax_lora.trainable_mask(state, also_train=r"head/(kernel|bias)"))
    assert {k for k, m in flat.items() if m} == {
        "fc/lora_a",
        "fc/lora_b",
        "head/kernel",
        "head/bias",
    }
    tx = jax_lora.optimizer(optax.sgd(1.0), also_train="head/kernel")
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, state), tx.init(state), state)
    assert {k for k, u in _flat(updates).items() if u} == {"fc/lora_a", "fc/lora_b", "head/kernel"}
    with pytest.raises(ValueError, match="`also_train` pattern 'head' matches no param") as e:
        jax_lora.trainable_mask(state, also_train="head")
    assert "head/kernel" in str(e.value) and "lora/bias" in str(e.value)


def test_nnx_param_report_also_train():
    model = jax_lora.wrap(_NnxModel(nnx.Rngs(0)), LoraConfig(rank=2, targets="fc"))
    base = (16 + 4) * 2 + 8 + 2 + 2
    rep = jax_lora.param_report(model)
    assert (rep.trainable, rep.total) == (16, base + 16)
    assert jax_lora.param_report(model, also_train="head/kernel").trainable == 16 + 8
    assert jax_lora.param_report(nnx.state(model)).trainable == 16
