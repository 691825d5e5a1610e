"""A quantized embedding lookup gathers the looked-up rows' codes and dequantizes only those
(`quant.take` / `quant.take_dequantized`), in linen (`nn.Embed` under `jax_lora.wrap`) and NNX
(`QuantEmbed`): bit-identical to ``jnp.take`` of the dequantized table (out-of-range ids as
``jnp.take``'s default ``mode="fill"``: NaN), and the compiled step's temporaries stay below
a quarter of the table's fp32 bytes (before: XLA on CPU fuses a q8_0 dequantization into the
gather, but an nf4 table's codes were unpacked whole, one byte per element, for every lookup).
Memory is read from ``memory_analysis()`` of the compiled step, no timing."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import LoraConfig, quant

V, D = 4096, 64  # the fp32 table: 1 MiB
IDS = jnp.array([[0, 3, 3, -1, 4095, 7], [4096, -4097, 9, 9, -4096, 100]], jnp.int32)
IN_RANGE = jnp.array([[0, 3, 3, -1, 4095, 7], [12, 4000, 9, 9, -4096, 100]], jnp.int32)
QTYPES = ("nf4", "int8", "q8_0", "q4_1")


def _same(got, want):
    """Equal values, NaN where ``want`` has NaN (bf16 compared through float32, exact)."""
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def _table(seed=0):
    return jax.random.normal(jax.random.key(seed), (V, D), jnp.float32)


def _q(qtype, axis=-1, **kw):
    return quant.quantize_array(_table(), qtype, axis=axis, **kw)


@pytest.mark.parametrize("qtype", QTYPES + ("fp8", "int4", "q4_0"))
@pytest.mark.parametrize("jit", [False, True])
def test_take_dequantized_is_jnp_take_of_the_dequantized_table(qtype, jit):
    q = _q(qtype)
    want = jnp.take(quant.dequantize_array(q), IDS, axis=0)
    got = (jax.jit(quant.take_dequantized) if jit else quant.take_dequantized)(q, IDS)
    assert got.shape == (2, 6, D) and got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # NaN rows included
    assert int(jnp.isnan(got).any(axis=-1).sum()) == 2  # 4096 and -4097
    assert quant.take(q, IDS).shape == (2, 6, D)


def test_take_per_channel_along_the_scale_axis_and_other_axes():
    q = _q("int8", axis=-2)  # one scale per column: rows gather, the scales stay
    want = jnp.take(quant.dequantize_array(q), IDS, axis=0)
    np.testing.assert_array_equal(np.asarray(quant.take_dequantized(q, IDS)), np.asarray(want))
    q = _q("nf4", axis=-2)  # blocks along the rows: columns gather
    cols = jnp.array([0, 63, 5, 5, -2], jnp.int32)
    want = jnp.take(quant.dequantize_array(q), cols, axis=1)
    np.testing.assert_array_equal(np.asarray(quant.take_dequantized(q, cols, 1)), np.asarray(want))


@pytest.mark.parametrize(
    ("q", "why"),
    [(_q("nf4", axis=-2), "run along axis 0"), (_q("nf4", double_quant=True), "double-quantized")],
)
def test_take_refuses_what_it_cannot_gather(q, why):
    assert not quant.can_take(q)
    with pytest.raises(ValueError, match=why):
        quant.take(q, IDS)


# ------------------------------------------------------------------------------ linen


class LM(nn.Module):
    dtype: object = None

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, dtype=self.dtype, name="emb")(ids)
        return h, nn.Dense(8, name="fc")(jnp.tanh(h.astype(jnp.float32)))


def _linen(qtype, dtype=None, **qkw):
    model = LM(dtype)
    params = model.init(jax.random.key(0), IN_RANGE)["params"]
    qparams = quant.quantize(params, qtype, targets="emb/embedding", axis=-1, **qkw)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4, targets=("fc",)))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qparams}, IN_RANGE)
    lora = jax.tree.map(lambda x: x + 0.1, lora)
    return wrapped, qparams, lora


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_linen_lookup_bit_identical(qtype, dtype):
    wrapped, qparams, lora = _linen(qtype, dtype)
    table = quant.dequantize_array(qparams["emb"]["embedding"])
    want = jnp.take(table if dtype is None else table.astype(dtype), IDS, axis=0)
    for apply in (wrapped.apply, jax.jit(wrapped.apply)):
        h, _ = apply({"params": qparams, "lora": lora}, IDS)
        assert h.dtype == want.dtype
        _same(h, want)


@pytest.mark.parametrize("qtype", ["nf4", "q4_1"])
def test_linen_grads_downstream_equal_the_dequantized_table(qtype):
    wrapped, qparams, lora = _linen(qtype)
    dense = quant.dequantize(qparams)
    probe = jax.random.normal(jax.random.key(3), (2, 6, 8), jnp.float32)

    def loss(lora, params):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, IN_RANGE)[1] * probe)

    g = jax.jit(jax.grad(loss))(lora, qparams)
    assert_close(g, jax.jit(jax.grad(loss))(lora, dense), 1e-6)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g)) > 0


@pytest.mark.parametrize("qkw", [{"double_quant": True}, {"axis": -2}])
def test_linen_fallback_layouts_still_equal(qkw):
    model = LM()
    params = model.init(jax.random.key(0), IN_RANGE)["params"]
    qparams = quant.quantize(params, "nf4", targets="emb/embedding", **{"axis": -1, **qkw})
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4, targets=("fc",)))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qparams}, IN_RANGE)
    h, _ = wrapped.apply({"params": qparams, "lora": lora}, IN_RANGE)
    want = jnp.take(quant.dequantize_array(qparams["emb"]["embedding"]), IN_RANGE, axis=0)
    _same(h, want)


def _temp_bytes(f, *args) -> int:
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_linen_compiled_step_temporaries_below_the_table():
    wrapped, qparams, lora = _linen("nf4")

    def loss(lora, params):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, IN_RANGE)[1])

    temp = _temp_bytes(jax.grad(loss), lora, qparams)
    assert temp < V * D // 4, temp  # before: the table's unpacked codes (V * D bytes) at least


# -------------------------------------------------------------------------------- NNX


class NnxLM(nnx.Module):
    def __init__(self, rngs, dtype=None):
        self.emb = nnx.Embed(V, D, dtype=dtype, rngs=rngs)
        self.fc = nnx.Linear(D, 8, rngs=rngs)

    def __call__(self, ids):
        h = self.emb(ids)
        return h, self.fc(jnp.tanh(h.astype(jnp.float32)))


def _nnx(qtype, dtype=None):
    model = NnxLM(nnx.Rngs(0), dtype)
    jax_lora.quantize(model, qtype, targets="emb/embedding", axis=-1)
    assert isinstance(model.emb, jax_lora.quant_nnx.QuantEmbed)
    return jax_lora.wrap(model, LoraConfig(rank=4, targets=("fc",)))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_nnx_lookup_bit_identical(qtype, dtype):
    model = _nnx(qtype, dtype)
    table = quant.dequantize_array(model.emb.embedding.get_value())
    want = jnp.take(table if dtype is None else table.astype(dtype), IDS, axis=0)
    for run in (lambda m, i: m(i), nnx.jit(lambda m, i: m(i))):
        h, _ = run(model, IDS)
        assert h.dtype == want.dtype
        _same(h, want)


def test_nnx_grads_and_compiled_temporaries():
    model = _nnx("nf4")
    graphdef, lo, rest = nnx.split(model, nnx.LoRAParam, ...)
    dense = _nnx("nf4")
    dense.emb.__dict__["embedding"].set_value(
        quant.dequantize_array(dense.emb.embedding.get_value())
    )
    dense = nnx.merge(*nnx.split(dense))  # the same values, an fp32 table

    def loss(lo, rest):
        return jnp.sum(nnx.merge(graphdef, lo, rest)(IN_RANGE)[1])

    g = jax.jit(jax.grad(loss))(lo, rest)
    gd_def, lo_d, rest_d = nnx.split(dense, nnx.LoRAParam, ...)
    g_d = jax.jit(jax.grad(lambda lo, r: jnp.sum(nnx.merge(gd_def, lo, r)(IN_RANGE)[1])))(
        lo_d, rest_d
    )
    assert_close(jax.tree.leaves(g), jax.tree.leaves(g_d), 1e-6)
    temp = _temp_bytes(jax.grad(loss), lo, rest)
    assert temp < V * D // 4, temp  # before: the table's unpacked codes (V * D bytes) at least
