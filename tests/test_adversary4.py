"""Issue #13 (QLoRA) attacked as a user would: odd qtypes, shapes, dtypes and values, GGUF
qtypes under a transformation, narrow NNX factors, and the round trips a user relies on
(pickle, orbax, NNX split/merge/state, jit with donation, gradients w.r.t. the codes)."""

import os
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close, perturbed
from flax import nnx

import jax_lora
from jax_lora import quant

RNG = np.random.default_rng(4)
W = RNG.standard_normal((128, 8)).astype(np.float32)
D = 128


# ------------------------------------------------------------------- GGUF qtypes under jit


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_gguf_qtype_under_jit_and_eval_shape_equals_the_concrete_encoder(qtype):
    """Quantizing a traced array as a GGUF type used to run the nf4/int4 path and label the
    result q4_0 (error 23 on N(0, 1) weights), or crash (q4_1: no minima; q8_0: shapes)."""
    pytest.importorskip("gguf")
    want = quant.quantize_array(W, qtype)
    got = jax.jit(lambda w: quant.quantize_array(w, qtype))(jnp.asarray(W))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize_array(got)), np.asarray(quant.dequantize_array(want))
    )
    shapes = jax.eval_shape(lambda w: quant.quantize_array(w, qtype), jnp.asarray(W))
    assert [(s.shape, s.dtype) for s in jax.tree.leaves(shapes)] == [
        (w.shape, w.dtype) for w in jax.tree.leaves(want)
    ]
    stack = np.stack([W, 2 * W])  # vmap over a stack of kernels: each quantized alone
    vm = jax.vmap(lambda w: quant.quantize_array(w, qtype))(jnp.asarray(stack))
    one = jax.tree.map(lambda x: x[1], vm)
    jax.tree.map(np.testing.assert_array_equal, one, quant.quantize_array(2 * W, qtype))


# --------------------------------------------------------------------- values and shapes


@pytest.mark.parametrize("qtype", ["nf4", "int4", "int8", "fp8", "q8_0"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_by_path_and_index(qtype, bad):
    """One NaN/inf would spread over its whole block (64 weights, or a row of 64 tokens of an
    embedding whose blocks run along the vocabulary): refused, naming the path and where."""
    w = W.copy()
    w[70, 3] = bad
    params = {"fc": {"kernel": jnp.asarray(w)}}
    with pytest.raises(ValueError, match=r"'fc/kernel'.*1 non-finite.*\(70, 3\)"):
        quant.quantize(params, qtype)
    assert np.isnan(np.asarray(params["fc"]["kernel"])[70, 3]) or np.isinf(w[70, 3])
    np.testing.assert_array_equal(np.asarray(params["fc"]["kernel"]), w)  # left as it was


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
def test_huge_weights_quantize_the_same_under_jit(qtype):
    """A block whose absmax is >= 2**126 has a subnormal reciprocal, which XLA:CPU flushes to
    zero: the traced quantizer returned an all-zero block while numpy's kept the values."""
    w = np.full((64, 4), 3e38, np.float32)
    w[::3] *= -0.5
    want = np.asarray(quant.dequantize_array(quant.quantize_array(w, qtype)))
    got = jax.jit(lambda x: quant.quantize_array(x, qtype))(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(got)), want)
    assert np.all(np.abs(want - w) <= np.abs(w).max() * 0.16)  # the 4-bit error bound


@pytest.mark.parametrize("qtype", ["int8", "fp8"])
def test_per_channel_zero_size_contraction_axis(qtype):
    """``(0, 8)``: nf4 quantizes it (no blocks); int8/fp8 raised numpy's 'zero-size array to
    reduction operation maximum'."""
    for shape in ((0, 8), (64, 0)):
        q = quant.quantize_array(np.zeros(shape, np.float32), qtype)
        assert q.shape == shape
        assert quant.dequantize_array(q).shape == shape
        traced = jax.jit(lambda x, qtype=qtype: quant.quantize_array(x, qtype))(jnp.zeros(shape))
        assert traced.shape == shape


def test_bad_block_axis_and_dtype_options_name_the_option():
    with pytest.raises(ValueError, match=r"`block`=2.5.*'fc/kernel'.*integer"):
        quant.quantize({"fc": {"kernel": jnp.asarray(W)}}, "nf4", block=2.5)
    with pytest.raises(ValueError, match=r"`block`=True.*integer"):
        quant.quantize_array(W, "nf4", block=True)
    with pytest.raises(ValueError, match=r"`axis`=1.0.*integer"):
        quant.quantize_array(W, "nf4", axis=1.0)
    with pytest.raises(ValueError, match=r"`dtype`=int32.*'fc/kernel'.*floating"):
        quant.quantize({"fc": {"kernel": jnp.asarray(W)}}, "nf4", dtype=jnp.int32)
    assert quant.quantize_array(W, "nf4", block=np.int64(32)).block == 32  # numpy ints are fine


# ------------------------------------------------------------------ NNX narrow factors


class NNet(nnx.Module):
    def __init__(self, rngs):
        self.fc0 = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, 16, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.fc0(jnp.tanh(x)))


@pytest.mark.parametrize("order", ["quantize_then_wrap", "wrap_then_quantize"])
def test_nnx_factors_narrower_than_the_quantized_compute_dtype_are_refused(order):
    """Linen refused bf16 factors on an fp32 quantized base; NNX ran them silently."""
    cfg = jax_lora.LoraConfig(rank=4, param_dtype=jnp.bfloat16)
    if order == "quantize_then_wrap":
        model = jax_lora.wrap(jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4"), cfg)
    else:
        model = jax_lora.quantize(jax_lora.wrap(NNet(nnx.Rngs(0)), cfg), "nf4")
    x = jnp.ones((2, D))
    with pytest.raises(ValueError, match=r"factor 'fc0/lora_a' is bfloat16, narrower.*float32"):
        model(x)
    ok = jax_lora.wrap(jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4"), jax_lora.LoraConfig(rank=4))
    assert ok(x).shape == (2, 16)


# --------------------------------------------------------------------------- round trips


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(D, name="fc0")(jnp.tanh(x))
        return nn.Dense(16, name="head")(x)


def _linen(qtype="nf4", **kw):
    x = jax.random.normal(jax.random.key(1), (4, D))
    params = Net().init(jax.random.key(0), x)["params"]
    wrapped = jax_lora.wrap(Net(), jax_lora.LoraConfig(rank=4))
    qparams = quant.quantize(params, qtype, **kw)
    lora = perturbed(jax_lora.init_lora(wrapped, jax.random.key(2), {"params": qparams}, x))
    return x, params, qparams, wrapped, lora


@pytest.mark.parametrize("kw", [{}, {"double_quant": True}])
def test_pickle_and_orbax_round_trip_a_quantized_tree(tmp_path, kw):
    import orbax.checkpoint as ocp

    x, _, q, wrapped, lora = _linen(**kw)
    y = wrapped.apply({"params": q, "lora": lora}, x)
    back = pickle.loads(pickle.dumps(q))
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.fspath(tmp_path / "q"), q)
        ck.wait_until_finished()
        restored = ck.restore(os.fspath(tmp_path / "q"), q)
    for other in (back, restored):
        is_q = quant.is_quantized
        assert jax.tree.structure(other, is_leaf=is_q) == jax.tree.structure(q, is_leaf=is_q)
        jax.tree.map(np.testing.assert_array_equal, other, q)
        assert repr(other["fc0"]["kernel"]) == repr(q["fc0"]["kernel"])
        assert_close(wrapped.apply({"params": other, "lora": lora}, x), y, 0)


def test_jit_with_donated_base_and_state_trains_and_gives_the_same_grads():
    import optax

    with jax.numpy_dtype_promotion("standard"):  # optax's internals
        _donated_steps(optax)


def _donated_steps(optax):

    x, _, q, wrapped, lora = _linen()

    def loss(lora, params):
        return jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, x)))

    want = jax.grad(loss)(lora, q)
    got = jax.jit(jax.grad(loss), donate_argnums=(1,))(
        lora, quant.quantize(quant.dequantize(q), "nf4")
    )
    assert_close(got, want, 1e-6)
    opt = optax.adam(1e-2)

    def step(lora, state, params):
        g = jax.grad(loss)(lora, params)
        u, state = opt.update(g, state, lora)
        return optax.apply_updates(lora, u), state

    step = jax.jit(step, donate_argnums=(0, 1))
    start = float(loss(lora, q))
    cur, state = jax.tree.map(jnp.copy, lora), opt.init(lora)
    for _ in range(3):
        cur, state = step(cur, state, q)
    assert float(loss(cur, q)) < start
    jax.tree.map(np.testing.assert_array_equal, q, quant.quantize(quant.dequantize(q), "nf4"))


def test_gradient_wrt_the_codes_is_float0_and_refused_without_allow_int():
    x, _, q, wrapped, lora = _linen()

    def loss(params):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, x))

    with pytest.raises(TypeError, match="uint8"):
        jax.grad(loss)(q)
    g = jax.grad(loss, allow_int=True)(q)
    assert g["fc0"]["kernel"].codes.dtype == jax.dtypes.float0
    # the base is frozen: no gradient reaches the block scales
    np.testing.assert_array_equal(np.asarray(g["fc0"]["kernel"].scales), 0)


def test_checkpoint_saved_on_a_float_base_restores_for_a_quantized_one(tmp_path):
    """The adapter is the same tree on either base: save with a float base, restore for the
    quantized one (and back); the variables dict is refused by name on both sides."""
    x, params, q, wrapped, lora = _linen()
    lora_f = perturbed(jax_lora.init_lora(wrapped, jax.random.key(2), {"params": params}, x))
    assert_close(lora_f, lora, 0)  # init ignores the base's storage
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(1, lora_f, wrapped.config)
        ck.wait()
        r = ck.restore(jax.eval_shape(lambda: lora))
        with pytest.raises(ValueError, match="the `lora` tree itself"):
            ck.save(2, {"params": q, "lora": lora}, wrapped.config)
        with pytest.raises(ValueError, match="the `lora` tree itself"):
            ck.restore({"params": q, "lora": lora})
    assert_close(
        wrapped.apply({"params": q, "lora": r.lora}, x),
        wrapped.apply({"params": quant.dequantize(q), "lora": lora_f}, x),
        1e-6,
    )


def test_nnx_split_merge_state_pickle_and_orbax_round_trips(tmp_path):
    import copy

    import orbax.checkpoint as ocp

    x = jax.random.normal(jax.random.key(1), (4, D))
    cfg = jax_lora.LoraConfig(rank=4)
    model = jax_lora.wrap(jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4", double_quant=True), cfg)
    lora_state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, perturbed(lora_state))
    y = model(x)
    g, lo, rest = nnx.split(model, nnx.LoRAParam, ...)
    assert not quant.has_quantized(lo) and quant.has_quantized(rest)
    outs = {
        "split/merge": nnx.merge(g, lo, rest)(x),
        "pickle": pickle.loads(pickle.dumps(model))(x),
        "deepcopy": copy.deepcopy(model)(x),
        "nnx.jit": nnx.jit(lambda m, x: m(x))(model, x),
    }
    other = jax_lora.wrap(jax_lora.quantize(NNet(nnx.Rngs(5)), "nf4", double_quant=True), cfg)
    with ocp.StandardCheckpointer() as ck:
        ck.save(os.fspath(tmp_path / "s"), nnx.state(model))
        ck.wait_until_finished()
        nnx.update(other, ck.restore(os.fspath(tmp_path / "s"), nnx.state(other)))
    outs["orbax"] = other(x)
    for name, out in outs.items():
        tol = 1e-6 if name == "nnx.jit" else 0  # XLA's fusion vs the eager ops
        assert float(jnp.max(jnp.abs(out - y))) <= tol * float(jnp.max(jnp.abs(y))), name


def test_adapter_checkpoint_refuses_a_tree_holding_the_base(tmp_path):
    """`AdapterCheckpointer.save` wrote the 4-bit base when given the NNX model, its state or
    a quantized params tree (only a dict with 'params'/'lora' keys was refused); nothing is
    written now and the folder stays empty of steps."""
    cfg = jax_lora.LoraConfig(rank=4)
    model = jax_lora.wrap(jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4"), cfg)
    q = quant.quantize({"fc": {"kernel": jnp.asarray(W)}}, "nf4")
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        with pytest.raises(ValueError, match=r"lora_state\(model\).*not the NNX NNet"):
            ck.save(1, model, cfg)
        with pytest.raises(ValueError, match=r"not the NNX State"):
            ck.save(1, nnx.state(model), cfg)
        with pytest.raises(ValueError, match=r"'fc0/kernel'.*quantized base weight"):
            ck.save(1, nnx.to_pure_dict(nnx.state(model)), cfg)
        with pytest.raises(ValueError, match=r"'fc/kernel'.*quantized base weight"):
            ck.save(1, q, cfg)
        assert ck.save(1, jax_lora.lora_state(model), cfg)
        ck.wait()
    assert sorted(p.name for p in (tmp_path / "ck").iterdir() if p.name.isdigit()) == ["1"]


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_gradient_of_an_empty_batch_is_zero(kind):
    """An empty batch (a last, empty shard of data): the forward pass gave ``(0, 16)`` but the
    backward pass's recomputation indexed the empty cotangent (IndexError)."""
    x = jnp.zeros((0, D))
    if kind == "linen":
        _, _, q, wrapped, lora = _linen()
        g = jax.grad(lambda lo: jnp.sum(wrapped.apply({"params": q, "lora": lo}, x)))(lora)
        leaves, want = jax.tree.leaves(g), len(jax.tree.leaves(lora))
    else:
        model = jax_lora.wrap(
            jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4"), jax_lora.LoraConfig(rank=4)
        )
        g = nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        leaves, want = jax.tree.leaves(g), len(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert len(leaves) == want > 0
    for leaf in leaves:
        np.testing.assert_array_equal(np.asarray(leaf), 0)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_gguf_scales_overflowing_float16_are_refused(qtype):
    """GGUF stores block scales in float16: a block whose scale passes 65504 (|w| ~ 5e5 for
    q4_0, 8e6 for q8_0) decoded to inf/NaN without a word; refused now, naming the path."""
    pytest.importorskip("gguf")
    w = W.copy()
    w[:32, 2] *= 1e7
    with pytest.raises(ValueError, match=r"'fc/kernel'.*float16"):
        quant.quantize({"fc": {"kernel": jnp.asarray(w)}}, qtype)
    ok = quant.quantize_array(W * 1e3, qtype)  # large but representable: fine
    assert np.isfinite(np.asarray(quant.dequantize_array(ok))).all()


def test_nnx_adapter_from_a_float_model_loads_into_a_quantized_one(tmp_path):
    """Train (here: perturb) on the float NNX model, checkpoint, restore into the quantized
    model: the same adapter, and the output of the float model on the dequantized base."""
    cfg = jax_lora.LoraConfig(rank=4)
    x = jax.random.normal(jax.random.key(1), (4, D))
    float_model = jax_lora.wrap(NNet(nnx.Rngs(0)), cfg)
    nnx.update(float_model, perturbed(nnx.state(float_model, nnx.LoRAParam)))
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(1, jax_lora.lora_state(float_model), cfg)
        ck.wait()
        r = ck.restore()
    qmodel = jax_lora.wrap(jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4"), r.config)
    jax_lora.load_lora(qmodel, r.lora)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax_lora.lora_state(qmodel),
        jax_lora.lora_state(float_model),
    )
    dense = jax_lora.dequantize(jax_lora.quantize(NNet(nnx.Rngs(0)), "nf4"))
    nnx.update(float_model, nnx.state(dense, nnx.Param))  # the float model on the nf4 values
    assert_close(qmodel(x), float_model(x), 1e-6)
