"""NF4 in blocks of 32 (the GGUF Q4_1 block; ``nf4_b32_dq`` of benchmarks/quant.py): our codes,
scales and dequantized values vs bitsandbytes' ``quantize_4bit(blocksize=32)`` /
``dequantize_4bit`` (its CPU path), plain and double-quantized, on real SmolLM2 and MiniLM
weights."""

from __future__ import annotations

import numpy as np

from .comparisons import ALL, Row

BLOCK = 32


def _nf4_block_rows(label: str, weights: dict[str, np.ndarray]) -> list[Row]:
    from .qlora import _nf4_rows  # here: qlora imports comparisons, which imports us

    return _nf4_rows(label, weights, block=BLOCK)


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
