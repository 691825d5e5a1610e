"""LoRA on quantized nnx.Conv / nnx.Embed / custom nnx.Param weights (QLoRA, NNX, by weight)
against the same model holding the dequantized weights as floats."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import quant, quant_nnx

D, V = 64, 128
WEIGHTS = ["emb/embedding", "conv/kernel", "custom/w"]


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # nnx internals
        yield


class Custom(nnx.Module):
    """A user's layer: its own ``w: (out, in)`` used as ``x @ w.T``."""

    def __init__(self, n_in, n_out, rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (n_out, n_in)))

    def __call__(self, x):
        return x @ self.w[...].T


class Net(nnx.Module):
    """Embedding lookup, a 2-D convolution, a custom layer, tied output (``attend``)."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, kernel_size=(3, 3), rngs=rngs)
        self.custom = Custom(D, D, rngs)

    def __call__(self, ids):  # ids: (B, H, W) -> logits (B, H, W, V)
        h = self.emb(ids)
        h = h + self.conv(jnp.tanh(h))
        return self.emb.attend(self.custom(jnp.tanh(h)))


IDS = jax.random.randint(jax.random.key(7), (2, 4, 4), 0, V)


def _cfg(**kw):
    return jax_lora.LoraConfig(rank=4, alpha=8, targets=WEIGHTS, **kw)


def _var(model, wpath):
    layer, name = wpath.split("/")
    return getattr(model, layer).__dict__[name]


def _random_lora(model):
    return jax.tree.map(
        lambda t: 0.05 * jax.random.normal(jax.random.key(t.size), t.shape),
        jax_lora.lora_state(model),
    )


def _loss(m, ids):
    return jnp.sum(jnp.sin(m(ids)))


def _grads(model):
    g = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, IDS)
    return nnx.to_pure_dict(g)


def _pair(qtype, kw, order, cfg):
    """(quantized + LoRA, the same with the dequantized weights as floats), same factors."""
    model = Net(nnx.Rngs(0))
    float_model = nnx.clone(model)
    if order == "quantize_then_wrap":
        jax_lora.quantize(model, qtype, targets=WEIGHTS, **kw)
        jax_lora.wrap(model, cfg, rngs=nnx.Rngs(3), example=(IDS,))
    else:
        jax_lora.wrap(model, cfg, rngs=nnx.Rngs(3), example=(IDS,))
        jax_lora.quantize(model, qtype, targets=WEIGHTS, **kw)
    dense = nnx.clone(float_model)
    for w in WEIGHTS:
        q = _var(model, w).get_value()
        assert quant.is_quantized(q) and q.shape == _var(float_model, w).get_value().shape
        _var(dense, w).set_value(quant.dequantize_array(q))
    jax_lora.wrap(dense, cfg, rngs=nnx.Rngs(3), example=(IDS,))
    lora = _random_lora(model)
    jax_lora.load_lora(model, lora)
    jax_lora.load_lora(dense, lora)
    return model, dense, lora


@pytest.mark.parametrize(
    "qtype,kw,order",
    [
        ("nf4", {}, "quantize_then_wrap"),
        ("nf4", {"double_quant": True}, "wrap_then_quantize"),
        ("int8", {}, "wrap_then_quantize"),
    ],
)
def test_lora_on_quantized_conv_embed_custom_equals_dequantized_float_model(qtype, kw, order):
    model, dense, lora = _pair(qtype, kw, order, _cfg())
    assert set(lora) == {"emb", "conv", "custom"}
    assert lora["conv"]["kernel"]["a"].shape == (3, 3, D, 4)  # (window..., in, r)
    assert lora["emb"]["embedding"]["a"].shape == (V, 4)
    for name in ("emb", "conv", "custom"):
        layer = getattr(model, name)
        assert isinstance(layer, quant_nnx._QuantLayer) and jax_lora.nnx.is_adapted(layer)
    y = nnx.jit(lambda m, ids: m(ids))(model, IDS)
    assert y.shape == (2, 4, 4, V)
    assert_close(y, dense(IDS), 1e-6)
    g, g_dense = nnx.jit(_grads)(model), _grads(dense)
    assert set(g) == {"emb", "conv", "custom"}
    assert np.abs(g["conv"]["kernel_lora_a"]).max() > 0  # a real gradient through the conv
    assert_close(g, g_dense, 1e-6)
    with jax_lora.disabled():
        assert_close(model(IDS), dense(IDS), 1e-6)
        y_base = model(IDS)
    assert np.abs(np.asarray(y - y_base)).max() > 1e-3  # the adapter does contribute
    assert_close(pickle.loads(pickle.dumps(model))(IDS), y, 1e-6)


def test_both_orders_give_one_class_and_merge_gives_plain_dense_model():
    a, _, _ = _pair("nf4", {}, "quantize_then_wrap", _cfg())
    b, dense, lora = _pair("nf4", {}, "wrap_then_quantize", _cfg())
    for name in ("emb", "conv", "custom"):
        assert type(getattr(a, name)) is type(getattr(b, name))
    merged = jax_lora.merge(b)
    assert quant.is_quantized(b.conv.kernel.get_value())  # the adapted model is unchanged
    assert (type(merged.emb), type(merged.conv), type(merged.custom)) == (
        nnx.Embed,
        nnx.Conv,
        Custom,
    )
    assert not quant.has_quantized(nnx.state(merged))
    want = jax_lora.merge(dense)  # the float model holding the dequantized weights
    for w in WEIGHTS:
        assert_close(_var(merged, w).get_value(), _var(want, w).get_value(), 0)
    assert_close(merged(IDS), b(IDS), 1e-5)
    plain = jax_lora.dequantize(nnx.clone(b))  # in place: float weights, LoRA kept
    assert type(plain.conv) is jax_lora.nnx.LoraConv and type(plain.emb) is jax_lora.nnx.LoraEmbed
    assert not quant.has_quantized(nnx.state(plain))
    assert_close(plain(IDS), b(IDS), 1e-6)
    assert_close(jax_lora.lora_state(plain), lora, 0)


def test_dropout_on_quantized_weights_draws_fresh_masks():
    model, dense, _ = _pair("int8", {}, "quantize_then_wrap", _cfg(dropout=0.3))
    model.eval()
    dense.eval()
    assert_close(model(IDS), dense(IDS), 1e-6)
    model.train()
    call = nnx.jit(lambda m, ids: m(ids))
    y1, y2 = call(model, IDS), call(model, IDS)
    assert np.abs(np.asarray(y1 - y2)).max() > 1e-4  # the stream advances between calls


def test_step_on_quantized_custom_weights_keeps_one_kernel_alive():
    """The compiled gradient step's temporaries hold about one dequantized weight, not one per
    layer (as tests/test_quant_nnx.py for Linear)."""
    layers, d = 6, 128

    class Deep(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Custom(d, d, rngs) for _ in range(layers)])

        def __call__(self, x):
            for blk in self.blocks:
                x = x + blk(jnp.tanh(x))
            return x

    x = jax.random.normal(jax.random.key(1), (4, d))
    model = jax_lora.quantize(Deep(nnx.Rngs(0)), "nf4", targets=r"blocks/\d+/w")
    jax_lora.wrap(model, jax_lora.LoraConfig(rank=4, targets=r"blocks/\d+/w"), example=(x,))
    assert isinstance(model.blocks[0], quant_nnx._QuantLayer)
    graphdef, lo, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lo, rest):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, lo, rest)(x)))

    mem = jax.jit(jax.grad(loss)).lower(lo, rest).compile().memory_analysis()
    fp32_kernels = layers * d * d * 4
    assert mem.temp_size_in_bytes < 0.35 * fp32_kernels, (mem.temp_size_in_bytes, fp32_kernels)
    assert mem.argument_size_in_bytes < 0.35 * fp32_kernels  # codes + scales + factors
