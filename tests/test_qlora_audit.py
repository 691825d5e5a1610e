"""Issue #13 (QLoRA) audit: the deliverables that had no test of their own. PEFT export and
linen adapter checkpoints on a quantized base (files compared with those of the float base),
merge re-quantized on request, GGUF Q4_0/Q8_0 kept quantized by the loader (bit for bit
``gguf``'s decoding, no fp32 copy of the model allocated while loading)."""

import dataclasses
import json
import tracemalloc

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close, perturbed

import jax_lora
from jax_lora import quant

D = 128


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = x + nn.Dense(D, name=f"fc{i}")(jnp.tanh(x))
        return nn.Dense(16, name="head")(x)


def _setup(qtype="nf4", **kw):
    x = jax.random.normal(jax.random.key(1), (4, D))
    params = Net().init(jax.random.key(0), x)["params"]
    wrapped = jax_lora.wrap(Net(), jax_lora.LoraConfig(rank=4, alpha=8, targets="fc0|fc1"))
    qparams = quant.quantize(params, qtype, **kw)
    lora = perturbed(jax_lora.init_lora(wrapped, jax.random.key(2), {"params": qparams}, x))
    return x, params, qparams, wrapped, lora


def _files(directory):
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in directory.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("kw", [{}, {"double_quant": True}])
def test_peft_export_on_a_quantized_base_is_byte_identical_to_the_float_base(tmp_path, kw):
    """Deliverable 3, PEFT export: init on either base gives the same factors, and the files
    written (adapter_config.json, adapter_model.safetensors) are the same bytes."""
    pytest.importorskip("safetensors")
    x, params, qparams, wrapped, lora = _setup(**kw)
    lora_f = perturbed(jax_lora.init_lora(wrapped, jax.random.key(2), {"params": params}, x))
    jax.tree.map(np.testing.assert_array_equal, lora, lora_f)
    jax_lora.export_peft(tmp_path / "q", lora, wrapped.config)
    jax_lora.export_peft(tmp_path / "f", lora_f, wrapped.config)
    q_files, f_files = _files(tmp_path / "q"), _files(tmp_path / "f")
    assert set(q_files) == {"adapter_config.json", "adapter_model.safetensors"}
    assert q_files == f_files
    cfg = json.loads(q_files["adapter_config.json"])
    assert sorted(cfg["target_modules"]) == ["fc0", "fc1"] and cfg["r"] == 4
    back, back_cfg = jax_lora.import_peft(tmp_path / "q", like=lora)
    assert (back_cfg.rank, back_cfg.alpha) == (4, 8)
    assert_close(
        wrapped.apply({"params": qparams, "lora": back}, x),
        wrapped.apply({"params": qparams, "lora": lora}, x),
        0,
    )


def test_linen_adapter_checkpoint_never_writes_the_quantized_base(tmp_path):
    """Deliverable 3, `AdapterCheckpointer` (linen; NNX is tests/test_quant_nnx.py): what is on
    disk is smaller than the codes and holds none of their bytes; the restore runs."""
    x, _, qparams, wrapped, lora = _setup()
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(3, lora, wrapped.config)
        ck.wait()
        r = ck.restore(lora)
    files = _files(tmp_path / "ck")
    written = sum(len(b) for b in files.values())
    codes = quant.nbytes(qparams)
    factors = sum(t.nbytes for t in jax.tree.leaves(lora))
    assert written < codes, (written, codes)  # ~factors + metadata
    assert written < factors + 64 * 1024
    for name in ("fc0", "fc1", "head"):
        q = qparams[name]["kernel"]
        for arr in (q.codes, q.scales):
            chunk = np.asarray(arr).tobytes()[:256]
            assert not any(chunk in b for b in files.values()), name
    assert_close(
        wrapped.apply({"params": qparams, "lora": r.lora}, x),
        wrapped.apply({"params": qparams, "lora": lora}, x),
        0,
    )


@pytest.mark.parametrize("qtype,kw", [("nf4", {}), ("nf4", {"double_quant": True}), ("int8", {})])
def test_merge_then_requantize_on_request(qtype, kw):
    """Deliverable 3, merge "or re-quantized on request": ``quantize(merge(...), qtype)``. The
    re-quantized kernels are those of the merged dense kernels bit for bit, a layer without an
    adapter gets its very codes back (quantizing a dequantized kernel is idempotent), and the
    wrapped model with LoRA switched off runs the result."""
    x, _, qparams, wrapped, lora = _setup(qtype, **kw)
    merged = jax_lora.merge({"params": qparams, "lora": lora}, wrapped.config)
    assert not quant.has_quantized(merged)
    requant = quant.quantize(merged, qtype, **kw)
    for name in ("fc0", "fc1", "head"):
        want = quant.quantize_array(np.asarray(merged[name]["kernel"]), qtype, **kw)
        jax.tree.map(np.testing.assert_array_equal, requant[name]["kernel"], want)
    # a layer without an adapter: its codes back as they were; its scales too, up to a rounding
    # of absmax / 127 (int8) or the re-taken mean of the double-quantized scales
    head, head0 = requant["head"]["kernel"], qparams["head"]["kernel"]
    np.testing.assert_array_equal(np.asarray(head.codes), np.asarray(head0.codes))
    tol = 1e-2 if kw else 1e-6
    assert_close(quant.dequantize_array(head), quant.dequantize_array(head0), tol)
    if qtype == "nf4" and not kw:
        jax.tree.map(np.testing.assert_array_equal, head, head0)
    codes_changed = np.mean(
        np.asarray(requant["fc0"]["kernel"].codes) != np.asarray(qparams["fc0"]["kernel"].codes)
    )
    assert codes_changed > 0.01  # the adapter's delta made it into the re-quantized codes
    base = wrapped.clone(enabled=False)
    y = base.apply({"params": requant}, x)
    assert_close(y, Net().apply({"params": quant.dequantize(requant)}, x), 1e-6)
    y_merged = Net().apply({"params": merged}, x)
    tol = {"nf4": 0.1, "int8": 0.01}[qtype]  # the re-quantization's own error, relative
    assert_close(y, y_merged, tol)


# ---------------------------------------------------------------------------------- GGUF


def _big_gguf(tmp_path, qtype):
    """A 2-layer Llama with hidden 256 (6 MB of fp32 weights) written as a GGUF of ``qtype``."""
    import _lm

    from jax_lora.lm import models

    cfg = dataclasses.replace(_lm.CFG, hidden_size=256, intermediate_size=512, vocab_size=260)
    tensors = _lm.tensors(0, cfg)
    path = str(tmp_path / f"m_{qtype}.gguf")
    models.write_gguf_model(path, cfg, tensors, _lm.tokenizer(), qtype=qtype)
    return path, sum(t.size * 4 for t in tensors.values())


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_gguf_q4_0_q8_0_load_kept_quantized_bit_identical_without_an_fp32_copy(tmp_path, qtype):
    """Deliverable 4 for Q4_0 and Q8_0 (the packaged SmolLM2 is Q4_1: tests/test_quant.py):
    every matrix loads as a `QArray` of the file's type, whose in-layer decoding equals
    ``gguf.quants.dequantize`` (q/k un-permuted, transposed) bit for bit; the numpy memory
    allocated while reading stays far below the model's fp32 size (the fp32 read allocates it
    all)."""
    gguf = pytest.importorskip("gguf")
    from jax_lora.lm import llama

    path, fp32_bytes = _big_gguf(tmp_path, qtype)
    cfg, tensors, _ = llama.read_gguf(path, keep_quantized=True)  # warm: jax's first compiles
    llama.params_from_hf(tensors, cfg)  # allocate Python objects that would count below
    del tensors
    tracemalloc.start()
    try:
        cfg, tensors, reader = llama.read_gguf(path, keep_quantized=True)
        params = llama.params_from_hf(tensors, cfg)
        _, kept_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        _, dense, _ = llama.read_gguf(path)
        _, dense_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dense_peak > 0.9 * fp32_bytes  # the measurement sees an fp32 copy
    # what stays is the codes and scales (q4_0: 0.14 of fp32, q8_0: 0.27; numpy's buffers, which
    # jax.device_put aliases on CPU) and the reader's fields; an fp32 copy of the model is 1.0
    assert kept_peak < 0.5 * fp32_bytes, (kept_peak, fp32_bytes)
    by_name = {t.name: t for t in reader.tensors}
    matrices = [t for t in reader.tensors if len(t.shape) == 2]
    assert len(matrices) == 1 + 7 * cfg.num_hidden_layers  # tied embedding + 7 per layer
    assert all(t.tensor_type.name.lower() == qtype for t in matrices)
    layers = params["model"]
    n_q = sum(quant.is_quantized(v) for v in jax.tree.leaves(params, is_leaf=quant.is_quantized))
    assert n_q == len(matrices)
    decode = jax.jit(quant.dequantize_array)
    for i in range(cfg.num_hidden_layers):
        for gname, (mod, proj), heads in [
            ("attn_q", ("self_attn", "q_proj"), cfg.num_attention_heads),
            ("attn_k", ("self_attn", "k_proj"), cfg.num_key_value_heads),
            ("attn_v", ("self_attn", "v_proj"), None),
            ("attn_output", ("self_attn", "o_proj"), None),
            ("ffn_gate", ("mlp", "gate_proj"), None),
            ("ffn_up", ("mlp", "up_proj"), None),
            ("ffn_down", ("mlp", "down_proj"), None),
        ]:
            t = by_name[f"blk.{i}.{gname}.weight"]
            want = gguf.quants.dequantize(t.data, t.tensor_type)
            want = want if heads is None else llama.gguf_unpermute(want, heads)
            q = layers[f"layers_{i}"][mod][proj]["kernel"]
            assert q.qtype == qtype and q.shape == want.T.shape
            np.testing.assert_array_equal(np.asarray(decode(q)), want.T)
            np.testing.assert_array_equal(np.asarray(dense[t_hf(i, mod, proj)]), want)
    emb = layers["embed_tokens"]["embedding"]
    t = by_name["token_embd.weight"]
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize_array(emb)), gguf.quants.dequantize(t.data, t.tensor_type)
    )


def t_hf(i, mod, proj):
    return f"model.layers.{i}.{mod}.{proj}.weight"


# ------------------------------------------------------------------------- quantizer edges


def _codes(q, column=0):
    """The unpacked 4-bit codes of one output column of a Dense QArray (high nibble first)."""
    c = np.asarray(q.codes)[:, column]
    return np.stack([c >> 4, c & 15], -1).reshape(-1)


@pytest.mark.parametrize("jit", [False, True])
def test_nf4_exact_midpoints_round_to_the_lower_level_as_bitsandbytes(jit):
    """Deliverable 5's tie rule, which real weights never hit: a value exactly between two NF4
    levels takes the lower one (bitsandbytes' ``torch.bucketize(x, midpoints)``, checked
    against its ``quantize_4bit`` when it is installed). No test failed when ties went up."""
    t = quant.NF4_TABLE
    mid = (t[:-1] + t[1:]) / np.float32(2)
    col = np.concatenate([mid, [1.0], np.zeros(48)]).astype(np.float32)  # absmax 1; mid < 0 too
    w = np.stack([col, col[::-1]], axis=1)  # (64, 2): a Dense kernel, one block per column
    q = jax.jit(quant.quantize_array, static_argnums=1)(w, "nf4") if jit else None
    q = q if jit else quant.quantize_array(w, "nf4")
    want = np.concatenate([np.arange(15), [15], np.full(48, 7)])
    np.testing.assert_array_equal(_codes(q), want)
    np.testing.assert_array_equal(_codes(q, 1), want[::-1])
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return
    import bitsandbytes.functional as bnbf
    import torch

    packed, _ = bnbf.quantize_4bit(torch.from_numpy(w.T.copy()), blocksize=64, quant_type="nf4")
    b = packed.numpy().reshape(-1)
    np.testing.assert_array_equal(np.stack([b >> 4, b & 15], -1).reshape(-1)[:64], want)


def test_double_quant_over_several_second_level_blocks_matches_numpy():
    """Double quantization when the flattened scales span more than one block of 256 and the
    last is padded (``(128, 200)``: 400 scales -> blocks of 256 + 144): the paper's recipe in
    numpy (tests/test_quant.py covers one block only)."""
    w = np.random.default_rng(7).standard_normal((128, 200)).astype(np.float32)
    dq = quant.quantize_array(w, "nf4", double_quant=True)
    absmax = np.abs(w.T.reshape(-1, 64)).max(axis=1)  # (out, in // 64), row-major: 400
    offset = np.float32(dq.scales_offset)  # XLA's float32 mean (its summation order)
    assert offset == pytest.approx(absmax.mean(dtype=np.float64), rel=1e-6)
    x = absmax - offset
    code = quant.dynamic_map()
    a2 = np.array([np.abs(x[:256]).max(), np.abs(x[256:]).max()], np.float32)
    scaled = x * np.repeat(np.float32(1) / a2, [256, 144])
    want_q = np.abs(scaled[:, None] - code).argmin(-1)
    assert dq.scales.shape == (400,) and dq.scales_scale.shape == (2,)
    np.testing.assert_array_equal(np.asarray(dq.scales_scale), a2)
    np.testing.assert_array_equal(np.asarray(dq.scales), want_q)
    got = np.asarray(quant._block_scales(dq)).T.reshape(-1)  # (2, 200) -> bnb order
    np.testing.assert_allclose(got, code[want_q] * np.repeat(a2, [256, 144]) + offset, rtol=1e-6)
