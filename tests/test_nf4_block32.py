"""NF4 with blocks of 32 (the GGUF Q4_1 block) and double quantization: codes, scales and bytes
against an independent numpy computation, scanned stacks, linen + NNX QLoRA, sharding names,
and the benchmark's ``nf4_b32_dq`` base."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import quant

RNG = np.random.default_rng(32)
# (in, out) with in = 96: 32 divides it, 64 does not
W = RNG.standard_normal((96, 40)).astype(np.float32)


def np_nf4_b32(w: np.ndarray):
    """NF4 of arXiv 2305.14314 §3 on ``w.T`` flattened as bitsandbytes does, blocks of 32
    inputs per output: (packed codes (bytes, row-major over (out, in // 2)), absmax (out *
    in // 32,), dequantized ``w``)."""
    rows = w.T.reshape(-1, 32)
    absmax = np.abs(rows).max(axis=1)
    scaled = rows * (np.float32(1) / absmax)[:, None]
    q = np.abs(scaled[..., None] - quant.NF4_TABLE).argmin(-1).astype(np.uint8)
    flat = q.reshape(-1)
    packed = (flat[0::2] << 4) | flat[1::2]
    deq = (quant.NF4_TABLE[q] * absmax[:, None]).reshape(w.shape[1], w.shape[0]).T
    return packed, absmax, deq


@pytest.mark.parametrize("traced", [False, True])
def test_codes_scales_values_match_numpy(traced):
    """The numpy quantizer (a concrete array) and the jax one (under jit) both."""
    fn = jax.jit(lambda w: quant.quantize_array(w, "nf4", block=32)) if traced else None
    q = fn(W) if traced else quant.quantize_array(W, "nf4", block=32)
    packed, absmax, deq = np_nf4_b32(W)
    assert q.block == 32 and q.shape == (96, 40)
    assert q.codes.shape == (48, 40) and q.codes.dtype == jnp.uint8
    assert q.scales.shape == (3, 40) and q.scales.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(q.codes).T.reshape(-1), packed)
    np.testing.assert_array_equal(np.asarray(q.scales).T.reshape(-1), absmax)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(q)), deq)
    # block 64 does not fit 96: refused by path, as before
    with pytest.raises(ValueError, match=r"'w' of shape \(96, 40\) as nf4 with `block`=64"):
        quant.quantize_array(W, "nf4", path="w")


def test_double_quant_matches_numpy_over_several_scale_blocks():
    """(512, 48) in blocks of 32: 768 scales, three double-quantization blocks of 256."""
    w = RNG.standard_normal((512, 48)).astype(np.float32)
    dq = quant.quantize_array(w, "nf4", block=32, double_quant=True)
    absmax = np.abs(w.T.reshape(-1, 32)).max(axis=1)  # bitsandbytes' order (out, in // 32)
    assert absmax.shape == (768,)
    offset = absmax.mean(dtype=np.float32)
    x = (absmax - offset).reshape(3, 256)
    a2 = np.abs(x).max(axis=1)
    code = quant.dynamic_map()
    want_q = np.abs((x / a2[:, None])[..., None] - code).argmin(-1).reshape(-1)
    assert dq.scales.shape == (768,) and dq.scales.dtype == jnp.uint8
    np.testing.assert_allclose(float(dq.scales_offset), offset, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dq.scales_scale), a2, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(dq.scales), want_q)
    # the codes are those without double quantization; only the scales change
    np.testing.assert_array_equal(
        np.asarray(dq.codes), np.asarray(quant.quantize_array(w, "nf4", block=32).codes)
    )
    got = np.asarray(quant._block_scales(dq)).T.reshape(-1)
    np.testing.assert_allclose(got, code[want_q] * np.repeat(a2, 256) + offset, rtol=1e-6)


def test_bytes_per_weight_within_the_issue_budget():
    """4 + 8/32 bits plus one fp32 absmax per 256 scales and one fp32 mean per kernel."""
    w = np.zeros((576, 1536), np.float32)  # a SmolLM2 q_proj-sized kernel (in, out)
    w[0] = 1.0  # not all-zero blocks (the values do not change the bytes)
    n_scales = 576 // 32 * 1536
    dq = quant.quantize_array(w, "nf4", block=32, double_quant=True)
    want_bits = 4 + 8 / 32 + (-(-n_scales // 256) + 1) * 32 / w.size
    assert quant.bits_per_weight(dq) == pytest.approx(want_bits, rel=1e-12)
    assert quant.bits_per_weight(dq) / 8 == pytest.approx(0.5317, abs=1e-4)
    assert quant.bits_per_weight(dq) / 8 <= 0.56
    plain = quant.quantize_array(w, "nf4", block=32)
    assert quant.bits_per_weight(plain) == 5.0  # one fp32 per 32: over 4.5 bits


@pytest.mark.parametrize("dq", [False, True])
def test_stacked_kernels_slice_like_each_layer(dq):
    """A scanned stack (layers, in, out) quantized at once equals each layer quantized alone;
    slicing every leaf (what nn.scan does) gives that layer's QArray."""
    stack = RNG.standard_normal((3, 64, 24)).astype(np.float32)
    q = quant.quantize_array(stack, "nf4", block=32, double_quant=dq)
    assert q.scales.shape == ((3, 48) if dq else (3, 2, 24))
    for i in range(3):
        one = quant.quantize_array(stack[i], "nf4", block=32, double_quant=dq)
        sliced = jax.tree.map(lambda x, i=i: x[i], q)
        jax.tree.map(np.testing.assert_array_equal, sliced, one)
        np.testing.assert_array_equal(np.asarray(quant.dequantize_array(sliced)), np_nf4_dq(one))


def np_nf4_dq(q) -> np.ndarray:
    """Independent dequantization of a (possibly double-quantized) NF4 ``(in, out)`` QArray."""
    codes = np.asarray(q.codes)
    nib = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1, codes.shape[1])  # (in, out)
    if q.scales_offset is None:
        scales = np.asarray(q.scales)  # (in // b, out)
    else:  # (out * in // b,) out-major, blocks of 256
        flat = quant.dynamic_map()[np.asarray(q.scales)]
        flat = flat * np.repeat(np.asarray(q.scales_scale), 256)[: flat.size]
        flat = flat + np.asarray(q.scales_offset)
        scales = flat.reshape(codes.shape[1], -1).T
    return quant.NF4_TABLE[nib] * np.repeat(scales, q.block, axis=0)


class Net(nn.Module):
    """Two residual Dense layers with a 96-wide input (block 64 would not fit) and a head."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = x + nn.Dense(96, name=f"fc{i}")(nn.tanh(x))
        return nn.Dense(8, name="head")(x)


def _loss(wrapped, x):
    return lambda lora, params: jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, x)))


@pytest.mark.parametrize("dq", [False, True])
def test_linen_qlora_forward_grads_merge_equal_dequantized_base(dq):
    x = jax.random.normal(jax.random.key(1), (4, 96))
    params = Net().init(jax.random.key(0), x)["params"]
    qparams = quant.quantize(params, "nf4", block=32, double_quant=dq)
    fc0 = qparams["fc0"]["kernel"]
    assert fc0.block == 32 and (fc0.scales_offset is not None) == dq
    dense = quant.dequantize(qparams)
    np.testing.assert_array_equal(np.asarray(dense["fc0"]["kernel"]), np_nf4_dq(fc0))
    wrapped = jax_lora.wrap(Net(), jax_lora.LoraConfig(rank=4, alpha=8))
    lora = jax_lora.init_lora(wrapped, jax.random.key(2), {"params": qparams}, x)
    lora = jax.tree.map(lambda t: t + 0.05, lora)
    y = jax.jit(wrapped.apply)({"params": qparams, "lora": lora}, x)
    assert y.shape == (4, 8)
    assert_close(y, wrapped.apply({"params": dense, "lora": lora}, x), 1e-6)
    g = jax.jit(jax.grad(_loss(wrapped, x)))(lora, qparams)
    assert_close(g, jax.grad(_loss(wrapped, x))(lora, dense), 1e-5)
    merged = jax_lora.merge({"params": qparams, "lora": lora}, wrapped.config)
    want = jax_lora.merge({"params": dense, "lora": lora}, wrapped.config)
    assert_close(merged["fc1"]["kernel"], want["fc1"]["kernel"], 0)


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.fc0 = nnx.Linear(96, 96, rngs=rngs)
        self.head = nnx.Linear(96, 8, rngs=rngs)

    def __call__(self, x):
        return self.head(x + self.fc0(jnp.tanh(x)))


def test_nnx_qlora_block32_equals_dequantized_float_model():
    x = jax.random.normal(jax.random.key(1), (4, 96))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets=["fc0", "head"])
    with jax.numpy_dtype_promotion("standard"):  # nnx internals
        model = jax_lora.wrap(jax_lora.quantize(NnxNet(nnx.Rngs(0)), "nf4", block=32), cfg)
        q = model.fc0.kernel.get_value()
        assert quant.is_quantized(q) and q.block == 32 and q.scales.shape == (3, 96)
        float_kernels = NnxNet(nnx.Rngs(0))  # the same init: its kernels, quantized by hand
        np.testing.assert_array_equal(
            np_nf4_dq(q), np_nf4_b32(np.asarray(float_kernels.fc0.kernel.get_value()))[2]
        )
        dense = jax_lora.wrap(jax_lora.dequantize(NnxNet(nnx.Rngs(0))), cfg)
        dense.fc0.kernel.set_value(jnp.asarray(np_nf4_dq(q)))
        dense.head.kernel.set_value(quant.dequantize_array(model.head.kernel.get_value()))
        for m in (model, dense):  # the same nonzero factors in both
            for layer in (m.fc0, m.head):
                layer.lora_b.set_value(jnp.full(layer.lora_b.get_value().shape, 0.05))
                layer.lora_a.set_value(jnp.full(layer.lora_a.get_value().shape, 0.02))
        assert_close(nnx.jit(lambda m, x: m(x))(model, x), dense(x), 1e-6)


def test_sharding_names_block32_scales_split_where_block64_cannot():
    """(128, 128) kernel over a 4 x 2 mesh: block 32 gives 4 blocks of scales, which the
    ``data`` axis splits; block 64's 2 blocks are replicated along it."""

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model"))
            return nn.Dense(128, kernel_init=init, name="fc")(x)

    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    v = Boxed().init(jax.random.key(0), jnp.ones((1, 128)))["params"]
    P = jax.sharding.PartitionSpec
    b32 = nn.get_partition_spec(quant.quantize(v, "nf4", block=32, mesh=mesh))["fc"]["kernel"]
    b64 = nn.get_partition_spec(quant.quantize(v, "nf4", mesh=mesh))["fc"]["kernel"]
    assert b32.codes == P("data", "model") and b32.scales == P("data", "model")
    assert b64.scales == P(None, "model")
    dq = quant.quantize(v, "nf4", block=32, double_quant=True, mesh=mesh)["fc"]["kernel"]
    assert dq.scales.value.shape == (128 * 4,)
    assert nn.get_partition_spec(dq.scales) == P("model")


def _bench():
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "quant.py")
    spec = importlib.util.spec_from_file_location("bench_quant_b32", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_nf4_b32_dq_base_from_q4_1_blocks():
    """The benchmark's ``nf4_b32_dq`` base of GGUF-style Q4_1 kernels: each kernel NF4 in
    blocks of 32 (one per Q4_1 block: the absmax of each block's decoded values) with
    double-quantized scales; the ``nf4`` configuration keeps blocks of 64."""
    import argparse

    bench = _bench()
    w = RNG.standard_normal((64, 16)).astype(np.float32)
    q41 = quant.quantize_array(w, "q4_1")
    params = {"lm": {"kernel": q41}, "norm": {"weight": jnp.ones(16)}}
    a = argparse.Namespace(scan=False, quant_embed=False)
    base = bench.make_base("nf4_b32_dq", params, None, a)
    k = base["lm"]["kernel"]
    assert k.qtype == "nf4" and k.block == 32 and k.scales_offset is not None
    decoded = np.asarray(quant.dequantize_array(q41))  # (64, 16): 2 Q4_1 blocks per column
    want = quant.quantize_array(decoded, "nf4", block=32, double_quant=True)
    jax.tree.map(np.testing.assert_array_equal, k, want)
    absmax = np.abs(decoded.reshape(2, 32, 16)).max(axis=1)
    np.testing.assert_array_equal(
        np.asarray(quant.quantize_array(decoded, "nf4", block=32).scales), absmax
    )
    assert bench.make_base("nf4", params, None, a)["lm"]["kernel"].block == 64
    assert not quant.is_quantized(base["norm"]["weight"])


def _quant_error():
    """benchmarks/quant_error.py (it imports benchmarks/quant.py as ``quant``)."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "quant_error.py")
    spec = importlib.util.spec_from_file_location("bench_quant_error", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quant_error_references_against_independent_numpy():
    """The analysis script's own quantizers: its least-squares NF4 with the scale grid ``[1]``
    is plain NF4 block 32 (`np_nf4_b32`) and the full grid never has a larger block error;
    `dq8` equals the library's double quantization of the same values; `q4_1_dq8` decodes the
    Q4_1 codes with those 8-bit ``d`` and ``m``."""
    qe = _quant_error()
    w = RNG.standard_normal((2, 64, 24)).astype(np.float32)
    plain = qe.nf4_mse(w, 32, np.array([1.0]))
    for i in range(2):
        np.testing.assert_array_equal(plain[i], np_nf4_b32(w[i])[2])
    best = qe.nf4_mse(w, 32)
    err = lambda x: ((x - w).reshape(2, 2, 32, 24) ** 2).sum(axis=2)  # noqa: E731
    assert np.all(err(best) <= err(plain)) and err(best).sum() < 0.95 * err(plain).sum()
    v = np.abs(RNG.standard_normal(600)).astype(np.float32)  # 3 blocks of 256, the last short
    k = np.zeros((32, 600), np.float32)
    k[0] = v  # one block of 32 per output: the block scales are ``v``, in order
    lib = quant.quantize_array(k, "nf4", block=32, double_quant=True)
    assert lib.scales.shape == (600,) and lib.scales_scale.shape == (3,)
    lib_scales = np.asarray(quant._block_scales(lib)).reshape(-1)
    # equal up to the mean's float32 summation order (jnp.mean there, numpy here)
    np.testing.assert_allclose(qe.dq8(v), lib_scales, rtol=0, atol=1e-6)
    assert 0 < np.abs(qe.dq8(v) - v).max() < 0.01 * v.max()
    w2 = RNG.standard_normal((64, 8)).astype(np.float32)
    q41 = quant.quantize_array(w2, "q4_1")
    got = qe.q4_1_dq8(q41)
    d = np.asarray(q41.scales, np.float32)  # (2, 8)
    m = np.asarray(q41.mins, np.float32)
    d8 = qe.dq8(d.T.reshape(-1)).reshape(8, 2).T
    m8 = qe.dq8(m.T.reshape(-1)).reshape(8, 2).T
    codes = np.rint((np.asarray(quant.dequantize_array(q41)) - np.repeat(m, 32, 0))
                    / np.repeat(d, 32, 0))  # fmt: skip
    np.testing.assert_allclose(got, np.repeat(d8, 32, 0) * codes + np.repeat(m8, 32, 0), atol=1e-6)
    rel = np.linalg.norm(got - np.asarray(quant.dequantize_array(q41))) / np.linalg.norm(w2)
    assert 0 < rel < 0.03


def test_base_through_orbax_keeps_codes_scales_and_block(tmp_path):
    """A block-32, double-quantized base saved with orbax comes back with the same codes,
    scales and static fields (``block`` 32: from the restore target's tree) and gives the same
    QLoRA output. (`AdapterCheckpointer` saves the factors only, whatever the base:
    tests/test_checkpoint.py.)"""
    import orbax.checkpoint as ocp

    x = jax.random.normal(jax.random.key(1), (4, 96))
    params = Net().init(jax.random.key(0), x)["params"]
    qparams = quant.quantize(params, "nf4", block=32, double_quant=True)
    like = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype), qparams)
    with ocp.StandardCheckpointer() as ck:
        ck.save(tmp_path / "base", qparams)
        ck.wait_until_finished()
        back = ck.restore(tmp_path / "base", like)
    k = back["fc0"]["kernel"]
    assert quant.is_quantized(k) and k.block == 32 and k.scales.dtype == jnp.uint8
    jax.tree.map(np.testing.assert_array_equal, back, qparams)
    wrapped = jax_lora.wrap(Net(), jax_lora.LoraConfig(rank=4, alpha=8))
    lora = jax_lora.init_lora(wrapped, jax.random.key(2), {"params": qparams}, x)
    lora = jax.tree.map(lambda t: t + 0.05, lora)
    assert_close(
        wrapped.apply({"params": back, "lora": lora}, x),
        wrapped.apply({"params": qparams, "lora": lora}, x),
        0,
    )
