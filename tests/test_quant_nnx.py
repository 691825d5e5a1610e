"""QLoRA for NNX (jax_lora.quantize on an nnx.Module) against its linen twin and a float model."""

import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import quant, quant_nnx

D, R = 128, 4
TARGETS = ["fc0", "mix", "out", "head"]
CFG = jax_lora.LoraConfig(rank=R, alpha=8, targets=TARGETS)


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax and nnx internals
        yield


class LinenNet(nn.Module):
    """Dense, Einsum (two contracted axes), DenseGeneral (two input axes), Dense head."""

    @nn.compact
    def __call__(self, x):
        h = x + nn.Dense(D, name="fc0")(jnp.tanh(x))
        mix = nn.Einsum((2, D // 2, D), "bnd,ndf->bf", use_bias=False, name="mix")
        h = h + mix(jnp.tanh(h).reshape(-1, 2, D // 2))
        h = nn.DenseGeneral(D, axis=(-2, -1), name="out")(h.reshape(-1, 2, D // 2))
        return nn.Dense(16, name="head")(h)


class NnxNet(nnx.Module):
    """`LinenNet` in NNX."""

    def __init__(self, rngs):
        self.fc0 = nnx.Linear(D, D, rngs=rngs)
        self.mix = nnx.Einsum("bnd,ndf->bf", (2, D // 2, D), rngs=rngs)
        self.out = nnx.LinearGeneral((2, D // 2), D, axis=(-2, -1), rngs=rngs)
        self.head = nnx.Linear(D, 16, rngs=rngs)

    def __call__(self, x):
        h = x + self.fc0(jnp.tanh(x))
        h = h + self.mix(jnp.tanh(h).reshape(-1, 2, D // 2))
        return self.head(self.out(h.reshape(-1, 2, D // 2)))


def _nnx_from(params):
    """An NnxNet holding linen ``params`` (float or quantized: set as they are)."""
    m = NnxNet(nnx.Rngs(0))
    for name in TARGETS:
        for k, v in params[name].items():
            getattr(m, name).__dict__[k].set_value(v)
    return m


def _setup(qtype, kw):
    x = jax.random.normal(jax.random.key(1), (4, D))
    params = LinenNet().init(jax.random.key(0), x)["params"]
    wrapped = jax_lora.wrap(LinenNet(), CFG)
    lora = wrapped.init(jax.random.key(2), x)["lora"]
    lora = jax.tree.map(lambda t: 0.05 * jax.random.normal(jax.random.key(t.size), t.shape), lora)
    return x, params, quant.quantize(params, qtype, **kw), wrapped, lora


def _loss(m, x):
    return jnp.sum(jnp.sin(m(x)))


def _factor_grads(model, x):
    """Gradients of the factors as a linen ``lora`` tree ``{layer: {"a", "b"}}``."""
    g = nnx.grad(_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x)
    return {k: {"a": g[k]["lora_a"][...], "b": g[k]["lora_b"][...]} for k in TARGETS}


@pytest.mark.parametrize(
    "qtype,kw,order",
    [
        ("nf4", {}, "quantize_then_wrap"),
        ("nf4", {"double_quant": True}, "wrap_then_quantize"),
        ("int8", {}, "wrap_then_quantize"),
    ],
)
def test_nnx_qlora_equals_linen_twin_and_dequantized_float_model(qtype, kw, order):
    x, params, qparams, wrapped, lora = _setup(qtype, kw)
    model = _nnx_from(params)
    if order == "quantize_then_wrap":
        assert jax_lora.quantize(model, qtype, **kw) is model
        jax_lora.wrap(model, CFG)
    else:
        jax_lora.quantize(jax_lora.wrap(model, CFG), qtype, **kw)
    jax_lora.load_lora(model, lora)
    other = jax_lora.wrap(jax_lora.quantize(NnxNet(nnx.Rngs(0)), qtype, **kw), CFG)
    for name in TARGETS:  # the same QArrays as linen's, in the layer's own nnx.Param
        layer = getattr(model, name)
        assert type(layer) is type(getattr(other, name))  # one class, whichever order
        assert isinstance(layer, quant_nnx._QuantLayer) and jax_lora.nnx.is_adapted(layer)
        assert type(layer.kernel) is nnx.Param
        jax.tree.map(
            np.testing.assert_array_equal, layer.kernel.get_value(), qparams[name]["kernel"]
        )
    # linen twin: same QArrays, same factors
    y_linen = wrapped.apply({"params": qparams, "lora": lora}, x)
    y = nnx.jit(lambda m, x: m(x))(model, x)
    assert y.shape == (4, 16)
    assert_close(y, y_linen, 1e-6)
    g_linen = jax.grad(
        lambda lo: jnp.sum(jnp.sin(wrapped.apply({"params": qparams, "lora": lo}, x)))
    )(lora)
    g = nnx.jit(_factor_grads)(model, x)
    assert_close(g, g_linen, 1e-6)
    # a float model holding the dequantized kernels, same factors
    dense = jax_lora.wrap(_nnx_from(quant.dequantize(qparams)), CFG)
    jax_lora.load_lora(dense, lora)
    assert not quant.has_quantized(nnx.state(dense))
    assert_close(y, dense(x), 1e-6)
    assert_close(g, _factor_grads(dense, x), 1e-6)
    with jax_lora.disabled():
        assert_close(model(x), LinenNet().apply({"params": quant.dequantize(qparams)}, x), 1e-6)


def test_state_split_merge_keep_qarrays_outside_lora_params():
    x, params, _, _, lora = _setup("nf4", {})
    model = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), CFG)
    jax_lora.load_lora(model, lora)
    y = model(x)
    lora_leaves = jax.tree.leaves(nnx.state(model, nnx.LoRAParam))
    assert sum(t.size for t in lora_leaves) == sum(t.size for t in jax.tree.leaves(lora))
    assert all(t.dtype == jnp.float32 for t in lora_leaves)  # no codes among the factors
    frozen = nnx.state(model, nnx.Not(nnx.LoRAParam))
    kernel = frozen["fc0"]["kernel"]
    assert type(kernel) is nnx.Param and quant.is_quantized(kernel.get_value())
    graphdef, lo, rest = nnx.split(model, nnx.LoRAParam, ...)
    back = nnx.merge(graphdef, lo, rest)
    assert type(back.fc0) is type(model.fc0) and quant.is_quantized(back.fc0.kernel.get_value())
    assert_close(back(x), y, 0)
    assert_close(pickle.loads(pickle.dumps(model))(x), y, 0)
    # the kernel bytes: codes and scales, never a float copy
    assert quant.nbytes(nnx.state(model, nnx.Not(nnx.LoRAParam))) < 0.2 * 4 * sum(
        int(np.prod(p["kernel"].shape)) for p in params.values()
    )


def test_nnx_qlora_step_keeps_one_kernel_alive():
    """As the linen test: the compiled gradient step's temporaries hold about one dequantized
    kernel, not one per layer."""
    layers = 6

    class Deep(nnx.Module):
        def __init__(self, rngs):
            self.fcs = nnx.List([nnx.Linear(D, D, rngs=rngs) for _ in range(layers)])
            self.head = nnx.Linear(D, 16, rngs=rngs)

        def __call__(self, x):
            for fc in self.fcs:
                x = x + fc(jnp.tanh(x))
            return self.head(x)

    model = jax_lora.wrap(
        jax_lora.quantize(Deep(nnx.Rngs(0)), "nf4"), jax_lora.LoraConfig(rank=4, targets="fcs/.*")
    )
    x = jax.random.normal(jax.random.key(1), (4, D))
    graphdef, lo, rest = nnx.split(model, nnx.LoRAParam, ...)

    def loss(lo, rest):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, lo, rest)(x)))

    mem = jax.jit(jax.grad(loss)).lower(lo, rest).compile().memory_analysis()
    fp32_kernels = layers * D * D * 4 + D * 16 * 4
    assert mem.temp_size_in_bytes < 0.35 * fp32_kernels, (mem.temp_size_in_bytes, fp32_kernels)
    assert mem.argument_size_in_bytes < 0.35 * fp32_kernels  # codes + scales + factors


def test_adam_steps_train_factors_codes_bit_identical():
    x, params, _, _, _ = _setup("nf4", {})
    model = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), CFG)
    y = jax.random.normal(jax.random.key(3), (4, 16))
    frozen = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    state = nnx.state(model, nnx.Param)
    tx = jax_lora.optimizer(optax.adam(1e-2))
    opt_state = tx.init(state)
    n_lora = sum(t.size for t in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    moments = [t for t in jax.tree.leaves(opt_state) if jnp.issubdtype(t.dtype, jnp.floating)]
    assert sum(t.size for t in moments) == 2 * n_lora  # no optimizer state for codes/scales

    @nnx.jit
    def step(model, opt_state):
        def loss(m):
            return jnp.mean((m(x) - y) ** 2)

        value, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        params = nnx.state(model, nnx.Param)
        full = jax.tree.map(jnp.zeros_like, params)  # the frozen base: zero gradients
        full = nnx.merge_state(full, g)
        updates, opt_state = tx.update(full, opt_state, params)
        nnx.update(model, optax.apply_updates(params, updates))
        return value, opt_state

    losses = []
    for _ in range(3):
        value, opt_state = step(model, opt_state)
        losses.append(float(value))
    assert losses[-1] < losses[0]
    after = nnx.state(model, nnx.Not(nnx.LoRAParam))
    jax.tree.map(np.testing.assert_array_equal, after, frozen)  # bit for bit
    assert after["fc0"]["kernel"].get_value().codes.dtype == jnp.uint8
    assert np.abs(np.asarray(model.fc0.lora_b[...])).max() > 0  # the factors did train


def test_merge_gives_plain_dense_model():
    x, params, qparams, _, lora = _setup("nf4", {})
    model = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), CFG)
    jax_lora.load_lora(model, lora)
    merged = jax_lora.merge(model)
    assert quant.is_quantized(model.fc0.kernel.get_value())  # the adapted model is unchanged
    assert all(
        type(getattr(merged, n)) in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum) for n in TARGETS
    )
    assert not quant.has_quantized(nnx.state(merged))
    want = jax_lora.merge({"params": qparams, "lora": lora}, CFG)  # linen: dequantized + ΔW
    for n in TARGETS:
        assert_close(getattr(merged, n).kernel[...], want[n]["kernel"], 0)
    assert_close(merged(x), model(x), 1e-5)
    plain = jax_lora.dequantize(nnx.clone(model))  # in place: float kernels, LoRA kept
    assert type(plain.fc0) is jax_lora.nnx.LoraLinear and not quant.has_quantized(nnx.state(plain))
    assert_close(plain(x), model(x), 1e-6)


def test_adapter_checkpoint_never_writes_the_base(tmp_path):
    x, params, _, _, lora = _setup("nf4", {})
    model = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), CFG)
    jax_lora.load_lora(model, lora)
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(1, jax_lora.lora_state(model), CFG)
        ck.wait()
        r = ck.restore(jax_lora.lora_state(model))
    written = sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
    codes = sum(t.nbytes for t in jax.tree.leaves(nnx.state(model, nnx.Not(nnx.LoRAParam))))
    assert written < codes  # the factors (~10 KB) and metadata only, not the 4-bit base
    fresh = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), r.config)
    jax_lora.load_lora(fresh, r.lora)
    assert_close(fresh(x), model(x), 0)


def test_conv_and_embed_quantized_base():
    class ConvEmbed(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Embed(64, 16, rngs=rngs)
            self.conv = nnx.Conv(16, 8, kernel_size=(4,), rngs=rngs)
            self.fc = nnx.Linear(8, 64, rngs=rngs)

        def __call__(self, ids):
            return self.emb.attend(self.fc(self.conv(self.emb(ids)))[..., :16])

    model = ConvEmbed(nnx.Rngs(0))
    ids = jnp.array([[1, 5, 9, 63]])
    dense = nnx.clone(model)
    jax_lora.quantize(model, "int8", targets=["emb/embedding", "conv/kernel"])
    assert isinstance(model.emb, quant_nnx.QuantEmbed) and isinstance(
        model.conv, quant_nnx.QuantConv
    )
    assert type(model.fc) is nnx.Linear  # not targeted
    for name, attr in (("emb", "embedding"), ("conv", "kernel")):
        var = getattr(dense, name).__dict__[attr]
        q = getattr(model, name).__dict__[attr].get_value()
        var.set_value(quant.dequantize_array(q))
    assert_close(model(ids), dense(ids), 1e-6)
    g = jax.grad(lambda w: jnp.sum(nnx.merge(*nnx.split(model))(ids) * w))(jnp.ones((1, 4, 64)))
    assert g.shape == (1, 4, 64)
    # LoRA on these quantized weights: tests/test_quant_nnx_weights.py


def test_bad_input_errors():
    model = NnxNet(nnx.Rngs(0))
    jax_lora.quantize(model, "nf4", targets="fc0/kernel")
    with pytest.raises(ValueError, match=r"already quantized \(e.g. 'fc0/kernel'\)"):
        jax_lora.quantize(model, "nf4")
    with pytest.raises(ValueError, match="nothing to quantize.*nope"):
        jax_lora.quantize(NnxNet(nnx.Rngs(0)), "nf4", targets="nope")
    bad = NnxNet(nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"'fc0/kernel' of shape \(128, 128\).*nf4 with `block`=48"
    ):
        jax_lora.quantize(bad, "nf4", block=48)
    assert type(bad.fc0) is nnx.Linear and not quant.is_quantized(bad.fc0.kernel.get_value())


def test_param_report_counts_logical_weights_of_a_quantized_base():
    _, params, qparams, _, lora = _setup("nf4", {})
    n_base = sum(int(np.size(t)) for t in jax.tree.leaves(params))
    n_lora = sum(int(np.size(t)) for t in jax.tree.leaves(lora))
    float_rep = jax_lora.param_report({"params": params, "lora": lora})
    assert (float_rep.trainable, float_rep.total) == (n_lora, n_base + n_lora)
    assert float_rep.base_bytes == 4 * n_base
    base_bytes = quant.nbytes(qparams)  # codes, scales and the float biases
    assert base_bytes < 0.2 * 4 * n_base
    rep = jax_lora.param_report({"params": qparams, "lora": lora})
    assert (rep.trainable, rep.total, rep.base_bytes) == (n_lora, n_base + n_lora, base_bytes)
    assert str(rep) == str(float_rep)  # the printed line: counts only, as before
    model = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), CFG)
    nrep = jax_lora.param_report(model)
    assert (nrep.trainable, nrep.total, nrep.base_bytes) == (n_lora, n_base + n_lora, base_bytes)
    also = jax_lora.param_report(model, also_train="head/bias")
    assert also.trainable == n_lora + 16 and also.base_bytes == base_bytes - 16 * 4


def test_dora_and_dropout_on_a_quantized_base():
    _, params, qparams, _, _ = _setup("nf4", {})
    x = jax.random.normal(jax.random.key(1), (4, D))
    cfg = jax_lora.LoraConfig(rank=R, alpha=8, targets=TARGETS, use_dora=True, dropout=0.1)
    model = jax_lora.wrap(jax_lora.quantize(_nnx_from(params), "nf4"), cfg, rngs=nnx.Rngs(5))
    dense = jax_lora.wrap(_nnx_from(quant.dequantize(qparams)), cfg, rngs=nnx.Rngs(5))
    lora = jax.tree.map(lambda t: t + 0.02, jax_lora.lora_state(model))
    assert set(lora["fc0"]) == {"a", "b", "m"}
    jax_lora.load_lora(model, lora)
    jax_lora.load_lora(dense, lora)
    model.eval()
    dense.eval()
    assert_close(model(x), dense(x), 1e-6)
    assert_close(_factor_grads(model, x), _factor_grads(dense, x), 1e-6)
    model.train()  # LoRA dropout draws from the layer's RngStream, held in the split state
    call = nnx.jit(lambda m, x: m(x))
    y1, y2 = call(model, x), call(model, x)
    assert np.abs(np.asarray(y1 - y2)).max() > 1e-4  # fresh masks each call
