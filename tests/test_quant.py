"""jax_lora.quant: the quantized-kernel math against independent numpy implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lora import quant

RNG = np.random.default_rng(0)
W = RNG.standard_normal((256, 48)).astype(np.float32)  # a Dense kernel (in, out)


def np_nf4(w: np.ndarray, block: int = 64):
    """NF4 as arXiv 2305.14314 §3 describes it, on ``W.T`` flattened as bitsandbytes does:
    blocks of ``block`` consecutive inputs per output, absmax-normalised, nearest table entry;
    codes packed two per byte, the first in the high nibble."""
    rows = w.T.reshape(-1, block)
    absmax = np.abs(rows).max(axis=1)
    scaled = rows * (np.float32(1) / absmax)[:, None]
    q = np.abs(scaled[..., None] - quant.NF4_TABLE).argmin(-1).astype(np.uint8)
    flat = q.reshape(-1)
    packed = (flat[0::2] << 4) | flat[1::2]
    deq = (quant.NF4_TABLE[q] * absmax[:, None]).reshape(w.shape[1], w.shape[0]).T
    return packed, absmax, deq


def test_nf4_codes_scales_values_match_numpy():
    q = quant.quantize_array(W, "nf4")
    packed, absmax, deq = np_nf4(W)
    assert q.codes.shape == (128, 48) and q.codes.dtype == jnp.uint8
    assert q.scales.shape == (4, 48) and q.shape == W.shape
    # our layout keeps the kernel's: (in // 2, out); bitsandbytes' is W.T flattened
    np.testing.assert_array_equal(np.asarray(q.codes).T.reshape(-1), packed)
    np.testing.assert_array_equal(np.asarray(q.scales).T.reshape(-1), absmax)
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(q)), deq)


def test_nf4_error_bound_and_bytes():
    q = quant.quantize_array(W, "nf4")
    err = np.abs(np.asarray(quant.dequantize_array(q)) - W)
    # nearest level: at most half the widest gap of the table (0.3038 / 2) times the absmax
    absmax = np.repeat(np.asarray(q.scales), 64, axis=0)
    assert np.all(err <= absmax * np.diff(quant.NF4_TABLE).max() / 2 + 1e-6)
    assert quant.bits_per_weight(q) == 4.5  # 4 bits + one fp32 per 64
    dq = quant.quantize_array(W, "nf4", double_quant=True)
    assert dq.scales.dtype == jnp.uint8 and dq.scales.shape == (4 * 48,)
    # 4 + 8/64 + one fp32 absmax for the 192 scales (< 256) + one fp32 offset, per 12288 weights
    assert quant.bits_per_weight(dq) == pytest.approx(4 + 8 / 64 + 2 * 32 / W.size, rel=1e-12)


def test_double_quant_matches_numpy():
    dq = quant.quantize_array(W, "nf4", double_quant=True)
    absmax = np.abs(W.T.reshape(-1, 64)).max(axis=1)  # bitsandbytes' order (out, in // 64)
    offset = absmax.mean(dtype=np.float32)
    x = absmax - offset
    code = quant.dynamic_map()
    a2 = np.abs(x).max()  # 192 scales: one block of 256
    want_q = np.abs((x / a2)[:, None] - code).argmin(-1)
    np.testing.assert_allclose(float(dq.scales_offset), offset, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(dq.scales_scale).reshape(-1), [a2], rtol=0)
    np.testing.assert_array_equal(np.asarray(dq.scales).reshape(-1), want_q)
    got_scales = np.asarray(quant._block_scales(dq))  # (4, 48)
    np.testing.assert_allclose(got_scales.T.reshape(-1), code[want_q] * a2 + offset, rtol=1e-6)
    # the scales' own error is small next to the 4-bit error
    err = np.abs(np.asarray(quant.dequantize_array(dq)) - W).max()
    assert err < 0.2 * np.abs(W).max()


def test_dynamic_map_shape():
    code = quant.dynamic_map()
    assert code.shape == (256,) and np.all(np.diff(code) >= 0)
    assert code[-1] == 1.0 and 0.0 in code and code[0] == pytest.approx(-0.99297, abs=1e-5)


@pytest.mark.parametrize("qtype,bits,tol", [("int4", 4.5, 1 / 14), ("int8", 8 + 32 / 256, 1 / 254)])
def test_int_error_bounds(qtype, bits, tol):
    q = quant.quantize_array(W, qtype)
    w = np.asarray(quant.dequantize_array(q))
    absmax = (
        np.repeat(np.abs(W.reshape(4, 64, 48)).max(1), 64, axis=0)
        if qtype == "int4"
        else np.abs(W).max(0, keepdims=True)
    )
    assert np.all(np.abs(w - W) <= absmax * tol * (1 + 1e-5))
    assert quant.bits_per_weight(q) == pytest.approx(bits)


def test_int8_matches_numpy():
    scale = np.abs(W).max(0, keepdims=True) / np.float32(127)
    codes = np.clip(np.round(W / scale), -127, 127).astype(np.int8)
    q = quant.quantize_array(W, "int8")
    np.testing.assert_array_equal(np.asarray(q.codes), codes)
    np.testing.assert_allclose(np.asarray(quant.dequantize_array(q)), codes * scale, rtol=3e-7)


def test_fp8_roundtrip():
    q = quant.quantize_array(W, "fp8")
    assert q.codes.dtype == jnp.float8_e4m3fn
    w = np.asarray(quant.dequantize_array(q))
    assert np.all(np.abs(w - W) <= np.abs(W) * 2.0**-4 + 1e-6 * np.abs(W).max())


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1", "q8_0"])
def test_gguf_blocks_bit_identical_to_gguf(qtype):
    gguf = pytest.importorskip("gguf")
    t = getattr(gguf.GGMLQuantizationType, qtype.upper())
    rows = W.T.copy()  # the file's layout (out, in): blocks of 32 along in
    raw = gguf.quants.quantize(rows, t)
    want = gguf.quants.dequantize(raw, t)  # (out, in)
    kept = quant.from_gguf(raw, qtype)  # file layout
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize_array)(kept)), want)
    dense = quant.from_gguf(raw, qtype, axis=-2)  # a Dense kernel (in, out)
    assert dense.shape == W.shape
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(dense)), want.T)
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize_array(quant.quantize_array(W, qtype))), want.T
    )


def test_stacked_kernels_slice_like_the_kernel():
    """A scanned stack (layers, in, out) quantized at once equals each layer quantized alone,
    and slicing every leaf of the QArray gives that layer's QArray (what nn.scan does)."""
    stack = RNG.standard_normal((3, 128, 16)).astype(np.float32)
    for kw in ({}, {"double_quant": True}):
        q = quant.quantize_array(stack, "nf4", **kw)
        for i in range(3):
            one = quant.quantize_array(stack[i], "nf4", **kw)
            sliced = jax.tree.map(lambda x, i=i: x[i], q)
            jax.tree.map(np.testing.assert_array_equal, sliced, one)
            np.testing.assert_array_equal(
                np.asarray(quant.dequantize_array(sliced)), np.asarray(quant.dequantize_array(one))
            )


def test_quantize_tree_targets_dtype_and_leaves_input_alone():
    params = {
        "a": {"kernel": jnp.asarray(W), "bias": jnp.ones(48)},
        "b": {"kernel": jnp.asarray(W[:64])},
        "emb": {"embedding": jnp.asarray(W)},
    }
    q = quant.quantize(params, "nf4", dtype=jnp.bfloat16)
    assert quant.is_quantized(q["a"]["kernel"]) and quant.is_quantized(q["b"]["kernel"])
    assert not quant.is_quantized(q["emb"]["embedding"]) and q["a"]["bias"] is params["a"]["bias"]
    assert quant.dequantize(q)["a"]["kernel"].dtype == jnp.bfloat16
    assert isinstance(params["a"]["kernel"], jax.Array)  # the input tree is untouched
    only = quant.quantize(params, "int8", targets=r"b/.*")
    assert quant.is_quantized(only["b"]["kernel"]) and not quant.is_quantized(only["a"]["kernel"])
    assert quant.nbytes(q["a"]) == 256 * 48 // 2 + 4 * 48 * 4 + 48 * 4


def test_bad_input_errors_name_the_path():
    params = {"fc": {"kernel": jnp.ones((100, 8))}}
    with pytest.raises(ValueError, match=r"'fc/kernel' of shape \(100, 8\).*block.*64.*100"):
        quant.quantize(params, "nf4")
    ok = quant.quantize(params, "nf4", block=20)
    assert ok["fc"]["kernel"].scales.shape == (5, 8)
    with pytest.raises(ValueError, match="already quantized.*'fc/kernel'"):
        quant.quantize(ok, "nf4", block=20)
    with pytest.raises(ValueError, match="'fc/kernel'.*int32 is not a floating"):
        quant.quantize({"fc": {"kernel": jnp.ones((64, 8), jnp.int32)}}, "nf4")
    with pytest.raises(ValueError, match="unknown qtype 'nf5'"):
        quant.quantize(params, "nf5")
    with pytest.raises(ValueError, match="nothing to quantize"):
        quant.quantize(params, "int8", targets="nope")
    with pytest.raises(ValueError, match="`double_quant`.*'int8'"):
        quant.quantize(params, "int8", double_quant=True)
