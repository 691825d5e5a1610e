"""NF4 in blocks of 32 (the GGUF Q4_1 block; ``nf4_b32_dq`` of benchmarks/quant.py): our codes,
scales and dequantized values vs bitsandbytes' ``quantize_4bit(blocksize=32)`` /
``dequantize_4bit`` (its CPU path), plain and double-quantized, on real SmolLM2 and MiniLM
weights."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch

from jax_lora import quant

from .comparisons import ALL, Row, row

BLOCK = 32


def _nf4_block_rows(label: str, weights: dict[str, np.ndarray]) -> list[Row]:
    import bitsandbytes.functional as F

    codes_ok, nearest, got, want, got_dq, want_dq, diffs = True, True, [], [], [], [], []
    for w in weights.values():  # torch (out, in): our kernel is w.T, blocks along `in`
        t = torch.from_numpy(w.copy())
        q = quant.quantize_array(w.T, "nf4", block=BLOCK)
        qt, st = F.quantize_4bit(t, blocksize=BLOCK, quant_type="nf4")
        codes_ok &= st.blocksize == BLOCK and st.absmax.numel() == w.size // BLOCK
        codes_ok &= bool(np.array_equal(np.asarray(q.codes).T.reshape(-1), qt.numpy().ravel()))
        codes_ok &= bool(np.array_equal(np.asarray(q.scales).T.reshape(-1), st.absmax.numpy()))
        got.append(np.asarray(quant.dequantize_array(q)).T)
        want.append(F.dequantize_4bit(qt, st))
        # double quantization: our decoding of their state, and our scale codes vs theirs
        qt2, st2 = F.quantize_4bit(t, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
        dq = quant.quantize_array(w.T, "nf4", block=BLOCK, double_quant=True)
        codes_ok &= bool(np.array_equal(np.asarray(dq.codes).T.reshape(-1), qt2.numpy().ravel()))
        theirs = dq.replace(
            scales=jnp.asarray(st2.absmax.numpy()),
            scales_scale=jnp.asarray(st2.state2.absmax.numpy()),
            scales_offset=jnp.asarray(st2.offset.numpy()),
        )
        got_dq.append(np.asarray(quant.dequantize_array(theirs)).T)
        want_dq.append(F.dequantize_4bit(qt2, st2))
        ours, bnb = np.asarray(dq.scales).astype(int), st2.absmax.numpy().astype(int)
        diffs.append(ours != bnb)
        # where they differ, ours is the nearest 8-bit code to the normalised scale (theirs one
        # to three codes off, near zero where the map's codes are dense)
        m = w.size // BLOCK
        x = np.abs(w.reshape(-1, BLOCK)).max(axis=1) - np.asarray(dq.scales_offset)
        x = x / np.repeat(np.asarray(dq.scales_scale), quant.DOUBLE_QUANT_BLOCK)[:m]
        code = quant.dynamic_map()
        nearest &= bool(np.all(np.abs(x - code[ours]) <= np.abs(x - code[bnb])))
    n = len(weights)
    frac = float(np.mean(np.concatenate(diffs)))
    return [
        Row(
            f"{label} NF4 block 32 ({n} Linear weights): codes + absmax equal bitsandbytes "
            "quantize_4bit(blocksize=32)",
            0.0 if codes_ok else 1.0,
            0.0 if codes_ok else 1.0,
            0.0,
            test="bitwise equal",
            ok=codes_ok,
        ),
        row(f"{label} NF4 block 32 dequantized vs bitsandbytes dequantize_4bit", got, want, 0.0),
        row(
            f"{label} NF4 block 32 + double quant: our dequantize of bitsandbytes' state vs theirs",
            got_dq,
            want_dq,
            0.0,
        ),
        # bitsandbytes' CPU `quantize_blockwise` (a binary search over the dynamic map) now and
        # then picks a code next to the nearest one (see torch_parity/qlora.py); we pick the
        # nearest
        Row(
            f"{label} NF4 block 32 double-quant scale codes vs bitsandbytes: {frac:.2%} differ, "
            "ours the nearest code there",
            0.0 if nearest else 1.0,
            frac,
            0.01,
            test="<1% of the 8-bit scale codes differ; where they do, ours is nearer",
            ok=bool(frac < 0.01 and nearest),
        ),
    ]


def nf4_block32_minilm() -> list[Row]:
    from .qlora import _minilm_linears  # here: qlora imports comparisons, which imports us

    return _nf4_block_rows("MiniLM", _minilm_linears())


def _smollm2_layer0() -> dict[str, np.ndarray]:
    """SmolLM2's layer-0 Linear weights as the GGUF stores them (``(out, in)``, q/k rows in
    llama.cpp's order: any real weights serve here), decoding only those 7 tensors."""
    import gguf

    from jax_lora.lm import llama

    reader = gguf.GGUFReader(llama.smollm2_gguf())
    names = [f"blk.0.{n}.weight" for n in ("attn_q", "attn_k", "attn_v", "attn_output")]
    names += [f"blk.0.{n}.weight" for n in ("ffn_gate", "ffn_up", "ffn_down")]
    tensors = {t.name: t for t in reader.tensors}
    return {
        n: np.asarray(
            gguf.quants.dequantize(tensors[n].data, tensors[n].tensor_type), np.float32
        ).reshape(tuple(int(d) for d in reversed(tensors[n].shape)))
        for n in names
    }


def nf4_block32_smollm2() -> list[Row]:
    return _nf4_block_rows("SmolLM2", _smollm2_layer0())


ALL["nf4_block32_minilm"] = nf4_block32_minilm
ALL["nf4_block32_smollm2"] = nf4_block32_smollm2
