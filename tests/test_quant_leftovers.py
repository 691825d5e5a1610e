"""Quantized-base leftovers (issue #13 item 3): non-LoRA params trained next to a quantized
kernel (``also_train``), linen containers with ``setup`` children, NNX sharding under logical
axis rules, and NNX stacked (``nnx.vmap``/``nnx.scan``) quantized layers.

The reference is always the same model holding ``dequantize(q)`` as float weights (an fp32 base
with the same values) and the same factors; fp32 throughout, tolerances relative to the largest
reference value.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _check import assert_close, max_rel_err
from flax import nnx

import jax_lora
from jax_lora import quant

D, OUT = 64, 8
X = jax.random.normal(jax.random.key(1), (2, 5, D))


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax and nnx internals
        yield


def _perturbed(tree, seed=11):
    """Factors moved off their init: b = 0 would hide a missing branch."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


# ------------------------------------------------------- 1. also_train next to a QArray


class LScaled(nn.Module):
    """A user's layer: a quantized ``w: (out, in)`` and a float ``g: (out,)`` in one scope."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (D, x.shape[-1]))
        g = self.param("g", nn.initializers.ones, (D,))
        return (x @ w.T) * g[None, None]


class LBias(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, L, D) -> (B, L, OUT)
        h = nn.Dense(D, name="fc")(x)  # adapted: the Dense path
        h = h + nn.Conv(D, (3,), name="conv")(jnp.tanh(h))  # adapted: the generic path
        h = LScaled(name="custom")(jnp.tanh(h))  # adapted: a custom weight
        h = nn.Dense(D, name="frozen")(jnp.tanh(h))  # quantized, no LoRA
        return nn.Dense(OUT, name="head")(jnp.tanh(h))  # float


ALSO = ("fc/bias", "conv/bias", "custom/g", "frozen/bias")


def _sub(params, new):
    """``params`` with the leaves at ``ALSO`` paths replaced by ``new[path]``."""
    out = jax.tree.map(lambda x: x, params, is_leaf=quant.is_quantized)
    for p, v in new.items():
        a, b = p.split("/")
        out[a] = {**out[a], b: v}
    return out


@pytest.mark.parametrize("qtype", ["nf4"])
def test_linen_also_train_params_of_quantized_layers_get_the_float_gradient(qtype):
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets="fc|conv|custom")
    wrapped = jax_lora.wrap(LBias(), cfg)
    v = wrapped.init(jax.random.key(0), X)
    lora = _perturbed(v["lora"])
    qp = quant.quantize(v["params"], qtype, targets="fc|conv|custom/w|frozen")
    dp = quant.dequantize(qp)
    extra = {p: _perturbed(dp[p.split("/")[0]][p.split("/")[1]], 3) for p in ALSO}

    def loss(params, extra, lora):
        y = wrapped.apply({"params": _sub(params, extra), "lora": lora}, X)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)))
    g_extra, g_lora = grad(qp, extra, lora)
    w_extra, w_lora = grad(dp, extra, lora)
    assert {p: g_extra[p].shape for p in ALSO} == {p: (D,) for p in ALSO}
    for p in ALSO:
        assert float(jnp.abs(w_extra[p]).max()) > 1e-3, p  # the reference is not zero
    errs = {p: max_rel_err(g_extra[p], w_extra[p]) for p in ALSO}
    assert max(errs.values()) <= 1e-5, errs
    assert_close(g_lora, w_lora, 1e-5)


class NScaled(nnx.Module):
    """A user's layer: a quantized ``w: (out, in)`` and a float ``g: (out,)``."""

    def __init__(self, rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (D, D)))
        self.g = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (D,)))

    def __call__(self, x):
        return (x @ self.w[...].T) * self.g[...][None, None]


class NBias(nnx.Module):
    """`LBias` in NNX."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, kernel_size=(3,), rngs=rngs)
        self.custom = NScaled(rngs)
        self.frozen = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        h = self.fc(x)
        h = h + self.conv(jnp.tanh(h))
        h = self.custom(jnp.tanh(h))
        return self.head(jnp.tanh(self.frozen(jnp.tanh(h))))


def _extra_and_lora_grads(model):
    """Gradients of the ``ALSO`` params and the factors, as a pure dict."""
    wrt = nnx.Any(nnx.LoRAParam, *(nnx.PathContains(p.split("/")[1]) for p in ALSO))
    g = nnx.grad(lambda m: jnp.sum(jnp.sin(m(X))), argnums=nnx.DiffState(0, wrt))(model)
    return nnx.to_pure_dict(g)


@pytest.mark.parametrize("order", ["quantize_then_wrap", "wrap_then_quantize"])
def test_nnx_also_train_params_of_quantized_layers_get_the_float_gradient(order):
    model = NBias(nnx.Rngs(0))
    for p in ALSO:  # biases off zero
        layer, name = p.split("/")
        var = getattr(model, layer).__dict__[name]
        var.set_value(_perturbed(var.get_value(), 3))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets=["fc", "conv", "custom/w"])
    qtargets = ["fc", "conv", "custom/w", "frozen"]
    if order == "quantize_then_wrap":
        jax_lora.quantize(model, "nf4", targets=qtargets)
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(3), example=(X,))
    if order == "wrap_then_quantize":
        jax_lora.quantize(model, "nf4", targets=qtargets)
    jax_lora.load_lora(model, _perturbed(jax_lora.lora_state(model)))
    assert quant.is_quantized(model.frozen.kernel.get_value())
    dense = jax_lora.dequantize(nnx.clone(model))  # the float base with the same values
    g, want = nnx.jit(_extra_and_lora_grads)(model), _extra_and_lora_grads(dense)
    errs = {}
    for p in ALSO:
        layer, name = p.split("/")
        assert g[layer][name].shape == (D,)
        assert float(jnp.abs(want[layer][name]).max()) > 1e-3, p  # the reference is not zero
        errs[p] = max_rel_err(g[layer][name], want[layer][name])
    assert max(errs.values()) <= 1e-5, errs
    assert_close(g, want, 1e-5)  # the factors' too
