"""Memory of building a quantized base: the quantizer compiles no XLA kernel per shape (its codes
and scales bit-identical to the jax implementation), and a GGUF read keeps no mapping of the
file alive once its reader is dropped."""

import gc
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lora import quant
from jax_lora.lm import llama
from jax_lora.lm import loss as lm_loss

# odd sizes on the other axes, 3-D (scanned) stacks, blocks along the last axis too
SHAPES = [((128, 7), -2), ((64, 3), -2), ((3, 192, 5), -2), ((5, 128), -1), ((2, 3, 256), -1)]


def _weights(shape, seed):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w.flat[0] = 0.0  # an exact zero, and a block of zeros (absmax 0) where there is room
    if shape[-2] >= 64:
        w[..., :64, 0] = 0.0
    return w


def _jax_reference(w, qtype, axis, double_quant=False, block=None):
    """The quantizer as it was: jax ops on a device array (`quant._quantize`)."""
    block = quant.DEFAULT_BLOCK.get(qtype, 1) if block is None else block
    return quant._quantize(jnp.asarray(w), qtype, block, axis, double_quant, np.dtype(np.float32))


def _assert_same(got, want):
    assert (got.qtype, got.block, got.axis, got.dtype) == (want.qtype, want.block, want.axis,
                                                          want.dtype)  # fmt: skip
    for f in quant._FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        assert (g is None) == (w is None), f
        if g is not None:
            assert np.asarray(g).dtype == np.asarray(w).dtype, f
            assert np.asarray(g).shape == np.asarray(w).shape, f
            # bit for bit (fp8 compared through its bytes)
            np.testing.assert_array_equal(
                np.atleast_1d(g).view(np.uint8), np.atleast_1d(w).view(np.uint8), err_msg=f
            )


@pytest.mark.parametrize("qtype", ["nf4", "int4", "int8", "fp8"])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_codes_and_scales_bit_identical_to_jax(qtype, shape, axis):
    w = _weights(shape, 0)
    _assert_same(quant.quantize_array(w, qtype, axis=axis), _jax_reference(w, qtype, axis))


@pytest.mark.parametrize("qtype", ["nf4", "int4"])
@pytest.mark.parametrize("shape", [(128, 7), (256, 40), (3, 192, 5)])
def test_double_quant_bit_identical_to_jax(qtype, shape):
    w = _weights(shape, 1)
    got = quant.quantize_array(w, qtype, double_quant=True)
    _assert_same(got, _jax_reference(w, qtype, -2, double_quant=True))


def test_other_block_and_traced_input():
    w = _weights((96, 5), 2)
    _assert_same(quant.quantize_array(w, "nf4", block=32), _jax_reference(w, "nf4", -2, block=32))
    # under jit the jax quantizer runs (the input is a tracer): same codes
    jitted = jax.jit(lambda x: quant.quantize_array(x, "nf4", block=32, double_quant=True))
    _assert_same(jitted(jnp.asarray(w)), _jax_reference(w, "nf4", -2, True, 32))


def _compiles(fn):
    names = []

    def listen(name, _duration, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            names.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return len(names)


def test_quantizing_a_new_shape_compiles_no_xla_kernel():
    # eager jax ops compile (and keep) one XLA executable per op and shape: ~30 per kernel shape.
    # Double quantization: one (the mean of the block scales must be XLA's own float32 sum)
    cases = [("nf4", False, 0), ("int4", False, 0), ("int8", False, 0), ("fp8", False, 0)]
    cases += [("nf4", True, 1), ("int4", True, 0)]  # int4 + dq: the same scales shape, cached
    for qtype, dq, most in cases:
        w = _weights((320, 11), 3)  # a shape no other test uses
        n = _compiles(
            lambda w=w, qtype=qtype, dq=dq: quant.quantize_array(w, qtype, double_quant=dq)
        )
        assert n <= most, (qtype, dq, n)


def test_numpy_quantized_base_gives_the_same_loss():
    cfg = llama.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = llama.Llama(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    params = model.init(jax.random.key(0), ids[:, :-1])["params"]
    kernels = lambda p: p[-1].key == "kernel"  # noqa: E731
    ours = jax.tree_util.tree_map_with_path(
        lambda p, x: quant.quantize_array(np.asarray(x), "nf4", double_quant=True)
        if kernels(p) else x, params,
    )  # fmt: skip
    ref = jax.tree_util.tree_map_with_path(
        lambda p, x: _jax_reference(x, "nf4", -2, double_quant=True) if kernels(p) else x, params
    )
    import jax_lora

    wrapped = jax_lora.wrap(model, jax_lora.LoraConfig(rank=2, targets=r".*_proj"))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": ours}, ids[:, :-1])

    def nll(p):
        v = {"params": p, "lora": lora}
        return lm_loss.llama_token_nll(wrapped.apply, v, ids[:, :-1], ids[:, 1:], chunk=8)

    np.testing.assert_array_equal(np.asarray(nll(ours)), np.asarray(nll(ref)))


def _write_tiny_gguf(path):
    """A 1-layer Llama GGUF: Q8_0 embedding, Q4_1 projections, F32 norms."""
    import gguf

    d, f, vocab, heads, kv = 64, 128, 32, 2, 1
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_token_list([f"t{i}" for i in range(vocab)])

    def add(name, shape, qtype):
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype is None:
            w.add_tensor(name, x)
            return
        t = getattr(gguf.GGMLQuantizationType, qtype)
        w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)

    add("token_embd.weight", (vocab, d), "Q8_0")
    add("output_norm.weight", (d,), None)
    hd = d // heads
    for name, shape in (
        ("attn_q", (d, d)), ("attn_k", (kv * hd, d)), ("attn_v", (kv * hd, d)),
        ("attn_output", (d, d)), ("ffn_gate", (f, d)), ("ffn_up", (f, d)), ("ffn_down", (d, f)),
    ):  # fmt: skip
        add(f"blk.0.{name}.weight", shape, "Q4_1")
    add("blk.0.attn_norm.weight", (d,), None)
    add("blk.0.ffn_norm.weight", (d,), None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_gguf_file_is_unmapped_once_the_reader_is_dropped(tmp_path):
    path = str(tmp_path / "tiny.gguf")
    _write_tiny_gguf(path)
    cfg, tensors, reader = llama.read_gguf(path, keep_quantized=True)
    assert quant.is_quantized(tensors["model.embed_tokens.weight"])
    assert not quant.is_quantized(tensors["model.norm.weight"])
    params = llama.params_from_hf(tensors, cfg)
    del reader
    gc.collect()
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if os.path.basename(path) in line]
    # every tensor kept (QArrays and fp32 norms) owns its memory: the file's pages can go
    assert mapped == [], mapped
    norm = np.asarray(params["model"]["norm"]["weight"])
    assert norm.shape == (64,) and norm.dtype == np.float32


@pytest.mark.parametrize("qtype", ["q8_0", "int8"])
def test_chunked_cross_entropy_on_a_quantized_head(qtype):
    # the tied embedding kept quantized (the GGUF's Q8_0, blocks along d): the loss and its
    # gradient equal those on the dequantized table, which is never an input of the scan
    rng = np.random.default_rng(0)
    table = rng.standard_normal((96, 64)).astype(np.float32)
    q = quant.quantize_array(table, qtype, axis=-1)
    w = quant.dequantize_array(q)
    h = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 96, (2, 5)), jnp.int32)

    def loss(h, weight):
        return lm_loss.chunked_cross_entropy(h, weight, y, chunk=4).sum()

    got, got_g = jax.jit(jax.value_and_grad(loss))(h, q)
    want, want_g = jax.jit(jax.value_and_grad(loss))(h, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-7)
    # and through llama_head: the QArray itself, not a dequantized copy
    head, tied = lm_loss.llama_head({"model": {"embed_tokens": {"embedding": q}}})
    assert tied and quant.is_quantized(head)


@pytest.mark.parametrize("transposed", [True, False])
def test_quantized_head_in_vocabulary_slices(transposed, monkeypatch):
    # slices of 32 rows of a 96-row vocabulary: the same loss and gradient as the whole table
    monkeypatch.setattr(lm_loss, "head_rows", 32)
    rng = np.random.default_rng(1)
    table = rng.standard_normal((96, 64)).astype(np.float32)
    if transposed:
        q = quant.quantize_array(table, "q8_0", axis=-1)  # blocks along d, rows = vocabulary
    else:
        q = quant.quantize_array(table.T, "nf4", axis=-2)  # a Dense head (d, vocab)
    w = quant.dequantize_array(q)
    h = jnp.asarray(rng.standard_normal((2, 5, 64)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 96, (2, 5)), jnp.int32)

    def loss(h, weight):
        return lm_loss.chunked_cross_entropy(h, weight, y, transposed=transposed, chunk=4).sum()

    got, got_g = jax.jit(jax.value_and_grad(loss))(h, q)
    want, want_g = jax.jit(jax.value_and_grad(loss))(h, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_g), np.asarray(want_g), rtol=1e-5, atol=1e-6)
    # the compiled loss never holds the whole dequantized table (96 x 64 fp32 = 24 KiB)
    m = jax.jit(jax.grad(loss)).lower(h, q).compile().memory_analysis()
    if m is not None:
        assert m.temp_size_in_bytes < table.nbytes, m.temp_size_in_bytes
