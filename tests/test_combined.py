"""Features that landed separately, used together: a quantized base under DoRA, named
adapters, per-layer alpha; the refusals where a combination is not supported yet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora
from jax_lora import LoraConfig


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(128, name="fc1")(x))
        return nn.Dense(64, name="fc2")(h)


X = jax.random.normal(jax.random.key(1), (4, 128))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def _params():
    return MLP().init(jax.random.key(0), X)["params"]


def _random_lora(lora, seed=3):
    """Non-zero factors (b starts at zero, which would hide a missing branch)."""
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree,
        [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_dora_on_a_quantized_base_equals_dora_on_its_dequantized_weights(qtype):
    params = _params()
    qparams = jax_lora.quantize(params, qtype)
    cfg = LoraConfig(rank=4, alpha=8, use_dora=True)
    model = jax_lora.wrap(MLP(), cfg)
    deq = jax_lora.dequantize(qparams)
    lora = model.init(jax.random.key(2), X)["lora"]
    lora = _random_lora(lora)

    def loss(lora, p):
        return jnp.sum(model.apply({"params": p, "lora": lora}, X) ** 2)

    # tolerance: fp32 compute, the same dequantized values on both sides
    want, g_want = jax.value_and_grad(loss)(lora, deq)
    got, g_got = jax.jit(jax.value_and_grad(loss))(lora, qparams)
    assert _rel(got, want) < 1e-5
    for (path, gg), gw in zip(
        jax.tree_util.tree_leaves_with_path(g_got), jax.tree.leaves(g_want), strict=True
    ):
        assert _rel(gg, gw) < 1e-5, jax.tree_util.keystr(path)
    # merge folds m·(W+ΔW)/‖W+ΔW‖ into the dequantized kernel (compute dtype, fp32 here)
    merged = jax_lora.merge({"params": qparams, "lora": lora}, cfg)
    assert (
        _rel(MLP().apply({"params": merged}, X), model.apply({"params": deq, "lora": lora}, X))
        < 1e-5
    )


def test_named_adapters_on_a_quantized_base_equal_the_dequantized_base():
    params = _params()
    qparams = jax_lora.quantize(params, "nf4")
    deq = jax_lora.dequantize(qparams)
    cfgs = {"x": LoraConfig(rank=2), "y": LoraConfig(rank=4, alpha=2.0, targets="fc2")}
    model = jax_lora.wrap(MLP(), cfgs)
    lora = _random_lora(model.init(jax.random.key(2), X)["lora"])
    ids = jnp.array([0, 1, -1, 1])
    got = jax.jit(lambda p, lo: model.apply({"params": p, "lora": lo}, X, adapter_ids=ids))(
        qparams, lora
    )
    want = model.apply({"params": deq, "lora": lora}, X, adapter_ids=ids)
    assert _rel(got, want) < 1e-5
    # and each row is its own adapter's single-adapter model on the dequantized base
    for row, name in enumerate(["x", "y", None, "y"]):
        if name is None:
            ref = MLP().apply({"params": deq}, X[row : row + 1])
        else:
            single = jax_lora.wrap(MLP(), cfgs[name])
            ref = single.apply({"params": deq, "lora": lora[name]}, X[row : row + 1])
        assert _rel(got[row : row + 1], ref) < 1e-5, name


def test_named_adapters_use_each_adapters_alpha_pattern():
    params = _params()
    cfgs = {
        "p": LoraConfig(rank=2, alpha=2.0, targets="fc1|fc2", alpha_pattern={"fc2": 8.0}),
        "q": LoraConfig(rank=2, alpha=2.0, targets="fc1|fc2"),
    }
    model = jax_lora.wrap(MLP(), cfgs)
    lora = _random_lora(model.init(jax.random.key(2), X)["lora"])
    ids = jnp.array([0, 0, 1, 1])
    got = model.apply({"params": params, "lora": lora}, X, adapter_ids=ids)
    active = model.clone(active=("p",)).apply({"params": params, "lora": lora}, X)
    for row, name in enumerate("ppqq"):
        single = jax_lora.wrap(MLP(), cfgs[name])
        ref = single.apply({"params": params, "lora": lora[name]}, X[row : row + 1])
        assert _rel(got[row : row + 1], ref) < 1e-6, name
        if name == "p":
            assert _rel(active[row : row + 1], ref) < 1e-6


def test_named_adapters_refuse_dora():
    with pytest.raises(ValueError, match="adapter 'd'.*DoRA"):
        jax_lora.wrap(MLP(), {"d": LoraConfig(rank=2, use_dora=True)})


def test_pissa_refuses_a_quantized_base():
    qparams = jax_lora.quantize(_params(), "nf4")
    cfg = LoraConfig(rank=2)
    lora = jax_lora.wrap(MLP(), cfg).init(jax.random.key(2), X)["lora"]
    with pytest.raises((TypeError, ValueError), match="fc1"):
        jax_lora.init_from_weights({"params": qparams, "lora": lora}, cfg, method="pissa")
