"""The new features used together: LoRA and DoRA on a quantized base (nf4, int8) of a 2-D
``Conv``, an ``Embed`` lookup, a user's own ``x @ w.T`` weight and a ``Dense``/``Linear`` head,
in linen and in NNX (NNX: quantize before or after `jax_lora.wrap`).

The reference is always the same wrapped model holding ``dequantize(q)`` as float weights (an
fp32 base with the same values) and the same factors: output and A/B/m gradients (jitted) must
agree to 1e-6 relative (fp32), ``disabled()`` must give the dequantized base model, and merge
must give what merging the dequantized-float model gives.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close, perturbed
from flax import nnx

import jax_lora
from jax_lora import quant

D, V, OUT = 64, 128, 16
LAYERS = ("emb", "conv", "custom", "head")
WEIGHTS = r"emb/embedding|conv/kernel|custom/w|head/kernel"
IDS = jax.random.randint(jax.random.key(7), (2, 4, 4), 0, V)
QTYPES = ["nf4", "int8"]


def _cfg(use_dora):
    return jax_lora.LoraConfig(rank=4, alpha=8, targets="|".join(LAYERS), use_dora=use_dora)


# ----------------------------------------------------------------------------------- linen


class LCustom(nn.Module):
    """A user's layer: its own ``w: (out, in)`` used as ``x @ w.T``."""

    features: int = D

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (self.features, x.shape[-1]))
        return x @ w.T


class LNet(nn.Module):
    @nn.compact
    def __call__(self, ids):  # ids: (B, H, W) -> (B, H, W, OUT)
        h = nn.Embed(V, D, name="emb")(ids)
        h = h + nn.Conv(D, (3, 3), name="conv")(jnp.tanh(h))
        h = LCustom(name="custom")(jnp.tanh(h))
        return nn.Dense(OUT, name="head")(jnp.tanh(h))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("qtype", QTYPES)
def test_linen_quantized_conv_embed_custom_dense_equal_dequantized_float_model(qtype, use_dora):
    cfg = _cfg(use_dora)
    wrapped = jax_lora.wrap(LNet(), cfg)
    variables = wrapped.init(jax.random.key(0), IDS)
    lora = perturbed(variables["lora"])
    assert set(lora) == set(LAYERS)
    if use_dora:
        assert lora["conv"]["kernel"]["m"].shape == (D,)
    qp = jax_lora.quantize(variables["params"], qtype, targets=WEIGHTS)
    dp = jax_lora.dequantize(qp)
    assert all(quant.is_quantized(qp[n][w]) for n, w in (s.split("/") for s in WEIGHTS.split("|")))

    def f(lo, p):
        return wrapped.apply({"params": p, "lora": lo}, IDS)

    def loss(lo, p):
        return jnp.sum(jnp.sin(f(lo, p)))

    y = jax.jit(f)(lora, qp)
    assert y.shape == (2, 4, 4, OUT)
    assert_close(y, f(lora, dp), 1e-6)
    g, g_want = jax.jit(jax.grad(loss))(lora, qp), jax.grad(loss)(lora, dp)
    assert np.abs(g["conv"]["kernel"]["a"]).max() > 0
    assert_close(g, g_want, 1e-6)
    with jax_lora.disabled():  # read at trace time: a function not traced before
        y_base = jax.jit(lambda lo, p: f(lo, p))(lora, qp)
    assert_close(y_base, LNet().apply({"params": dp}, IDS), 1e-6)
    assert np.abs(np.asarray(y - y_base)).max() > 1e-3  # the adapter does contribute
    merged = jax_lora.merge({"params": qp, "lora": lora}, wrapped, IDS)
    assert not quant.has_quantized(merged)
    assert_close(merged, jax_lora.merge({"params": dp, "lora": lora}, wrapped, IDS), 1e-6)
    assert_close(LNet().apply({"params": merged}, IDS), y, 1e-5)


# ------------------------------------------------------------------------------------- NNX


@pytest.fixture
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # nnx internals
        yield


class Custom(nnx.Module):
    """A user's layer: its own ``w: (out, in)`` used as ``x @ w.T``."""

    def __init__(self, rngs, d=D):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (d, d)))

    def __call__(self, x):
        return x @ self.w[...].T


class Net(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, kernel_size=(3, 3), rngs=rngs)
        self.custom = Custom(rngs)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, ids):  # ids: (B, H, W) -> (B, H, W, OUT)
        h = self.emb(ids)
        h = h + self.conv(jnp.tanh(h))
        h = self.custom(jnp.tanh(h))
        return self.head(jnp.tanh(h))


def _var(model, wpath):
    layer, name = wpath.split("/")
    return getattr(model, layer).__dict__[name]


def _grads(model):
    def loss(m):
        return jnp.sum(jnp.sin(m(IDS)))

    return nnx.to_pure_dict(nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model))


def _nnx_pair(qtype, order, use_dora):
    """(quantized + LoRA, the same wrapped over the dequantized weights as floats), with the
    same (perturbed) factors; and whether the fresh adapter left the quantized model unchanged."""
    cfg = _cfg(use_dora)
    model = Net(nnx.Rngs(0))
    float_model = nnx.clone(model)
    if order == "quantize_then_wrap":
        jax_lora.quantize(model, qtype, targets=WEIGHTS)
        jax_lora.wrap(model, cfg, rngs=nnx.Rngs(3), example=(IDS,))
    else:
        jax_lora.wrap(model, cfg, rngs=nnx.Rngs(3), example=(IDS,))
        jax_lora.quantize(model, qtype, targets=WEIGHTS)
    dense = nnx.clone(float_model)
    for w in WEIGHTS.split("|"):
        q = _var(model, w).get_value()
        assert quant.is_quantized(q) and q.shape == _var(float_model, w).get_value().shape
        _var(dense, w).set_value(quant.dequantize_array(q))
    jax_lora.wrap(dense, cfg, rngs=nnx.Rngs(3), example=(IDS,))
    with jax_lora.disabled():
        base = model(IDS)
    fresh_is_base = float(jnp.abs(model(IDS) - base).max() / jnp.abs(base).max())
    lora = perturbed(jax_lora.lora_state(dense))
    jax_lora.load_lora(model, lora)
    jax_lora.load_lora(dense, lora)
    return model, dense, fresh_is_base


@pytest.mark.usefixtures("_standard_promotion")
@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("order", ["quantize_then_wrap", "wrap_then_quantize"])
@pytest.mark.parametrize("qtype", QTYPES)
def test_nnx_quantized_conv_embed_custom_linear_equal_dequantized_float_model(
    qtype, order, use_dora
):
    model, dense, fresh_is_base = _nnx_pair(qtype, order, use_dora)
    if order == "quantize_then_wrap":  # b = 0 (and m = ‖W‖ of the dequantized weight): base
        assert fresh_is_base < 1e-6
    lora = jax_lora.lora_state(model)
    assert set(lora) == set(LAYERS)
    if use_dora:
        assert set(lora["conv"]["kernel"]) == {"a", "b", "m"}
    y = nnx.jit(lambda m, ids: m(ids))(model, IDS)
    assert y.shape == (2, 4, 4, OUT)
    assert_close(y, dense(IDS), 1e-6)
    g = nnx.jit(_grads)(model)
    assert np.abs(g["conv"]["kernel_lora_a"]).max() > 0
    assert_close(g, _grads(dense), 1e-6)
    with jax_lora.disabled():  # read at trace time: a function not traced before
        y_base = nnx.jit(lambda m, ids: m(ids) + 0)(model, IDS)
        assert_close(y_base, dense(IDS), 1e-6)
    assert np.abs(np.asarray(y - y_base)).max() > 1e-3
    merged = jax_lora.merge(model)
    assert not quant.has_quantized(nnx.state(merged))
    want = jax_lora.merge(dense)
    for w in WEIGHTS.split("|"):
        assert_close(_var(merged, w).get_value(), _var(want, w).get_value(), 1e-6)
    assert_close(merged(IDS), y, 1e-5)


# --------------------------------------------------------------------- quantize's targets


def test_linen_quantize_targets_accept_module_paths_as_lora_config():
    params = jax_lora.wrap(LNet(), _cfg(False)).init(jax.random.key(0), IDS)["params"]
    by_module = jax_lora.quantize(params, "int8", targets="conv|emb|custom")
    by_weight = jax_lora.quantize(params, "int8", targets=r"conv/kernel|emb/embedding|custom/w")
    quantized = {
        jax.tree_util.keystr(kp, simple=True, separator="/")
        for kp, x in jax.tree_util.tree_leaves_with_path(by_module, is_leaf=quant.is_quantized)
        if quant.is_quantized(x)
    }
    assert quantized == {"conv/kernel", "emb/embedding", "custom/w"}  # conv/bias stays float
    assert_close(jax_lora.dequantize(by_module), jax_lora.dequantize(by_weight), 0)
    with pytest.raises(ValueError, match=r"`targets` \['nope'\] matches no weight.*conv/kernel"):
        jax_lora.quantize(params, "int8", targets="nope")


@pytest.mark.usefixtures("_standard_promotion")
def test_nnx_quantize_targets_accept_module_paths_as_lora_config():
    model = jax_lora.quantize(Net(nnx.Rngs(0)), "int8", targets="conv|emb|custom")
    for w in ("conv/kernel", "emb/embedding", "custom/w"):
        assert quant.is_quantized(_var(model, w).get_value()), w
    assert not quant.is_quantized(model.conv.bias.get_value())
    assert not quant.is_quantized(model.head.kernel.get_value())
    want = jax_lora.quantize(
        Net(nnx.Rngs(0)), "int8", targets=r"conv/kernel|emb/embedding|custom/w"
    )
    for w in ("conv/kernel", "emb/embedding", "custom/w"):
        assert_close(
            quant.dequantize_array(_var(model, w).get_value()),
            quant.dequantize_array(_var(want, w).get_value()),
            0,
        )
    with pytest.raises(ValueError, match=r"`targets` \['nope'\] matches no weight.*conv/kernel"):
        jax_lora.quantize(Net(nnx.Rngs(0)), "int8", targets="nope")


# ------------------------------------------------------------------ memory of the DoRA step

DEEP, DW = 8, 256  # the weights dominate the temporaries


class LDeep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(DEEP):
            x = x + jnp.tanh(LCustom(DW, name=f"c{i}")(x))
        return x


class Deep(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([Custom(rngs, DW) for _ in range(DEEP)])

    def __call__(self, x):
        for blk in self.blocks:
            x = x + jnp.tanh(blk(x))
        return x


def test_linen_dora_step_on_quantized_custom_weights_keeps_about_one_weight_alive():
    """DoRA on a quantized weight is recomputed in the backward pass: the compiled step's
    temporaries hold one layer's kernel-sized arrays, none kept per layer (XLA shared B·A
    between the forward pass and the recomputation, one kernel-sized residual per layer)."""
    x = jax.random.normal(jax.random.key(1), (4, DW))
    wrapped = jax_lora.wrap(LDeep(), jax_lora.LoraConfig(rank=4, targets=r"c\d", use_dora=True))
    variables = wrapped.init(jax.random.key(0), x)
    qp = jax_lora.quantize(variables["params"], "nf4", targets=r"c\d")

    def loss(lora, params):
        return jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, x)))

    mem = jax.jit(jax.grad(loss)).lower(variables["lora"], qp).compile().memory_analysis()
    fp32_weights = DEEP * DW * DW * 4
    # one layer's W, B·A and W + s·B·A (3/8 of the weights); was one more weight per layer
    assert mem.temp_size_in_bytes < 0.6 * fp32_weights, (mem.temp_size_in_bytes, fp32_weights)


@pytest.mark.usefixtures("_standard_promotion")
def test_nnx_dora_step_on_quantized_custom_weights_keeps_about_one_weight_alive():
    x = jax.random.normal(jax.random.key(1), (4, DW))
    model = jax_lora.quantize(Deep(nnx.Rngs(0)), "nf4", targets=r"blocks/\d+")
    cfg = jax_lora.LoraConfig(rank=4, targets=r"blocks/\d+", use_dora=True)
    jax_lora.wrap(model, cfg, example=(x,))
    assert set(jax_lora.lora_state(model)["blocks"]["0"]["w"]) == {"a", "b", "m"}
    graphdef, lo, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lo, rest):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, lo, rest)(x)))

    mem = jax.jit(jax.grad(loss)).lower(lo, rest).compile().memory_analysis()
    fp32_weights = DEEP * DW * DW * 4
    # one layer's W, B·A and W + s·B·A (3/8 of the weights); was one more weight per layer
    assert mem.temp_size_in_bytes < 0.6 * fp32_weights, (mem.temp_size_in_bytes, fp32_weights)


class LDenseDeep(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(DEEP):
            x = x + jnp.tanh(nn.Dense(DW, name=f"c{i}")(x))
        return x


class DenseDeep(nnx.Module):
    def __init__(self, rngs):
        self.blocks = nnx.List([nnx.Linear(DW, DW, rngs=rngs) for _ in range(DEEP)])

    def __call__(self, x):
        for blk in self.blocks:
            x = x + jnp.tanh(blk(x))
        return x


@pytest.mark.usefixtures("_standard_promotion")
def test_dora_step_on_quantized_dense_and_linear_keeps_about_one_weight_alive():
    """DoRA on a quantized Dense (linen) / Linear (NNX): the norm of the dequantized kernel is
    recomputed in the backward pass (it kept two fp32 kernels per layer)."""
    x = jax.random.normal(jax.random.key(1), (4, DW))
    fp32_weights = DEEP * DW * DW * 4
    cfg = jax_lora.LoraConfig(rank=4, targets=r"c\d|blocks/\d+", use_dora=True)
    wrapped = jax_lora.wrap(LDenseDeep(), cfg)
    variables = wrapped.init(jax.random.key(0), x)
    qp = jax_lora.quantize(variables["params"], "nf4")
    assert set(variables["lora"]["c0"]) == {"a", "b", "m"}

    def loss(lora, params):
        return jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, x)))

    mem = jax.jit(jax.grad(loss)).lower(variables["lora"], qp).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.6 * fp32_weights, (mem.temp_size_in_bytes, fp32_weights)

    model = jax_lora.quantize(DenseDeep(nnx.Rngs(0)), "nf4")
    jax_lora.wrap(model, cfg, example=(x,))
    assert set(jax_lora.lora_state(model)["blocks"]["0"]) == {"a", "b", "m"}
    graphdef, lo, rest = nnx.split(model, nnx.LoRAParam, ...)

    def nnx_loss(lo, rest):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, lo, rest)(x)))

    mem = jax.jit(jax.grad(nnx_loss)).lower(lo, rest).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.6 * fp32_weights, (mem.temp_size_in_bytes, fp32_weights)


@pytest.mark.parametrize("qtype", QTYPES)
def test_linen_dora_with_dropout_on_quantized_dense_equals_dequantized_float_model(qtype):
    """While dropout runs, DoRA's base part is the dequantized kernel's matmul of the dropped
    input (computed inside the recomputed evaluation): values and A/B/m grads as on floats."""
    x = jax.random.normal(jax.random.key(1), (4, DW))
    cfg = jax_lora.LoraConfig(rank=4, targets=r"c\d", use_dora=True, dropout=0.3)
    wrapped = jax_lora.wrap(LDenseDeep(), cfg)
    variables = wrapped.init(jax.random.key(0), x)
    lora = perturbed(variables["lora"])
    qp = jax_lora.quantize(variables["params"], qtype)
    dp = jax_lora.dequantize(qp)

    def loss(lo, p):
        y = wrapped.apply({"params": p, "lora": lo}, x, rngs={"dropout": jax.random.key(5)})
        return jnp.sum(jnp.sin(y))

    got, g = jax.jit(jax.value_and_grad(loss))(lora, qp)
    want, g_want = jax.jit(jax.value_and_grad(loss))(lora, dp)
    assert_close(got, want, 1e-6)
    # 8 layers in fp32; XLA fuses the recomputed backward differently from the float one (1.2e-6)
    assert_close(g, g_want, 3e-6)
    no_drop = jax.jit(lambda lo, p: jnp.sum(jnp.sin(wrapped.apply({"params": p, "lora": lo}, x))))
    assert abs(float(no_drop(lora, qp) - got)) > 1e-3  # the masks do act
