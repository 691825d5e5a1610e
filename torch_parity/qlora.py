"""QLoRA parity: our NF4 (jax_lora.quant) vs bitsandbytes' ``quantize_4bit``/``dequantize_4bit``
on real MiniLM and SmolLM2 weights (bitsandbytes' CPU path), and a QLoRA forward + gradients vs
PEFT LoRA on a bitsandbytes ``Linear4bit`` (fp32 compute)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jax_lora
from jax_lora import quant

from .comparisons import ALL, FWD_TOL, Row, row


def _minilm_linears(n: int = 4) -> dict[str, np.ndarray]:
    """A few torch-layout ``(out, in)`` Linear weights of all-MiniLM-L6-v2."""
    from safetensors.numpy import load_file

    from examples.models import bert

    t = load_file(os.path.join(bert.minilm_dir(), "model.safetensors"))
    names = [k for k in sorted(t) if k.endswith(".weight") and t[k].ndim == 2 and "embed" not in k]
    return {k: t[k].astype(np.float32) for k in names[:n]}


def _smollm2_linears() -> dict[str, np.ndarray]:
    from jax_lora.lm import llama

    _, tensors, _ = llama.read_gguf(llama.smollm2_gguf())
    keys = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]
    keys += [f"model.layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return {k: tensors[k] for k in keys}


def _nf4_rows(label: str, weights: dict[str, np.ndarray], block: int = 64) -> list[Row]:
    """Our NF4 (``block``) vs bitsandbytes' ``quantize_4bit``/``dequantize_4bit`` (CPU path) on
    torch-layout ``(out, in)`` weights: codes, absmax, dequantized values, plain and with
    double quantization (our decoding of their state; our 8-bit scale codes vs theirs)."""
    import bitsandbytes.functional as F

    tag = "NF4" if block == 64 else f"NF4 block {block}"
    call = "quantize_4bit" if block == 64 else f"quantize_4bit(blocksize={block})"
    codes_ok, nearest, got, want, got_dq, want_dq, scale_diff = True, True, [], [], [], [], []
    for w in weights.values():  # torch (out, in): our kernel is w.T, blocks along `in`
        t = torch.from_numpy(w.copy())
        q = quant.quantize_array(w.T, "nf4", block=block)
        qt, st = F.quantize_4bit(t, blocksize=block, quant_type="nf4")
        codes_ok &= st.blocksize == block and st.absmax.numel() == w.size // block
        ours = np.asarray(q.codes).T.reshape(-1)  # (out, in // 2) row-major = bnb's bytes
        codes_ok &= bool(np.array_equal(ours, qt.numpy().reshape(-1)))
        codes_ok &= bool(np.array_equal(np.asarray(q.scales).T.reshape(-1), st.absmax.numpy()))
        got.append(np.asarray(quant.dequantize_array(q)).T)
        want.append(F.dequantize_4bit(qt, st))
        # double quantization: decode bitsandbytes' own state (NF4 codes, 8-bit scale codes,
        # their absmax and offset) with our dequantize, and compare our scale codes with theirs
        qt2, st2 = F.quantize_4bit(t, blocksize=block, quant_type="nf4", compress_statistics=True)
        dq = quant.quantize_array(w.T, "nf4", block=block, double_quant=True)
        codes_ok &= bool(np.array_equal(np.asarray(dq.codes).T.reshape(-1), qt2.numpy().ravel()))
        theirs = dq.replace(
            codes=jnp.asarray(qt2.numpy().reshape(w.shape[0], -1).T),
            scales=jnp.asarray(st2.absmax.numpy()),
            scales_scale=jnp.asarray(st2.state2.absmax.numpy()),
            scales_offset=jnp.asarray(st2.offset.numpy()),
        )
        got_dq.append(np.asarray(quant.dequantize_array(theirs)).T)
        want_dq.append(F.dequantize_4bit(qt2, st2))
        ours, bnb = np.asarray(dq.scales).astype(int), st2.absmax.numpy().astype(int)
        scale_diff.append(np.abs(ours - bnb))
        # where they differ, is ours the nearest 8-bit code to the normalised scale?
        m = w.size // block
        x = np.abs(w.reshape(-1, block)).max(axis=1) - np.asarray(dq.scales_offset)
        x = x / np.repeat(np.asarray(dq.scales_scale), quant.DOUBLE_QUANT_BLOCK)[:m]
        code = quant.dynamic_map()
        nearest &= bool(np.all(np.abs(x - code[ours]) <= np.abs(x - code[bnb])))
    n = len(weights)
    # bitsandbytes' CPU `quantize_blockwise` (its binary search over the dynamic map) now and
    # then picks a code next to the nearest one (one to three codes off, near zero where the
    # map's codes are dense); we pick the nearest
    diff = np.concatenate([d.reshape(-1) for d in scale_diff])
    frac = float(np.mean(diff != 0))
    if block == 64:
        scale_row = Row(
            f"{label} NF4 double-quant scale codes vs bitsandbytes: {frac:.2%} differ, by "
            f"{int(diff.max())} step at most",
            float(diff.max()),
            frac,
            0.01,
            test="<1% of the 8-bit scale codes differ, each by one step",
            ok=bool(frac < 0.01 and diff.max() <= 1),
        )
    else:
        scale_row = Row(
            f"{label} {tag} double-quant scale codes vs bitsandbytes: {frac:.2%} differ, "
            "ours the nearest code there",
            0.0 if nearest else 1.0,
            frac,
            0.01,
            test="<1% of the 8-bit scale codes differ; where they do, ours is nearer",
            ok=bool(frac < 0.01 and nearest),
        )
    return [
        Row(
            f"{label} {tag} ({n} Linear weights): codes + absmax equal bitsandbytes {call}",
            0.0 if codes_ok else 1.0,
            0.0 if codes_ok else 1.0,
            0.0,
            test="bitwise equal",
            ok=codes_ok,
        ),
        row(f"{label} {tag} dequantized vs bitsandbytes dequantize_4bit", got, want, 0.0),
        row(
            f"{label} {tag} + double quant: our dequantize of bitsandbytes' state vs theirs",
            got_dq,
            want_dq,
            0.0,
        ),
        scale_row,
    ]


def qlora_nf4_minilm() -> list[Row]:
    return _nf4_rows("MiniLM", _minilm_linears())


def qlora_nf4_smollm2() -> list[Row]:
    return _nf4_rows("SmolLM2", _smollm2_linears())


def qlora_peft_bnb_linear4bit_minilm() -> list[Row]:
    """A MiniLM query weight as a bitsandbytes ``Linear4bit`` (nf4, fp32 compute) with PEFT LoRA
    (r 8, random A/B) vs the same as a ``Dense`` with a `jax_lora.quantize`d kernel: output and
    the gradients of A and B."""
    import bitsandbytes as bnb
    import flax.linen as nn
    from peft import LoraConfig, get_peft_model

    w = next(iter(_minilm_linears(1).values()))  # (out, in)
    out_f, in_f = w.shape
    rank, alpha = 8, 16

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = bnb.nn.Linear4bit(
                in_f, out_f, bias=False, compute_dtype=torch.float32, quant_type="nf4"
            )

        def forward(self, x):
            return self.fc(x)

    tnet = TorchNet()
    tnet.fc.weight = bnb.nn.Params4bit(
        torch.from_numpy(w.copy()),
        requires_grad=False,
        quant_type="nf4",
        blocksize=64,
        compress_statistics=False,  # (its default is double quantization)
    )
    tnet = tnet.to("cpu")  # quantizes (bitsandbytes' CPU path)
    pm = get_peft_model(tnet, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["fc"]))
    layer = pm.base_model.model.fc
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(0.1 * torch.randn(rank, in_f, generator=g))
        layer.lora_B["default"].weight.copy_(0.1 * torch.randn(out_f, rank, generator=g))
    x = torch.randn(4, 7, in_f, generator=g)
    y_t = pm(x)
    (y_t**2).sum().backward()

    class FlaxNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(out_f, use_bias=False, name="fc")(x)

    cfg = jax_lora.LoraConfig(rank=rank, alpha=alpha, targets=["fc"])
    wrapped = jax_lora.wrap(FlaxNet(), cfg)
    params = jax_lora.quantize({"fc": {"kernel": jnp.asarray(w.T)}}, "nf4")
    lora = {
        "fc": {
            "a": jnp.asarray(layer.lora_A["default"].weight.detach().numpy().T),
            "b": jnp.asarray(layer.lora_B["default"].weight.detach().numpy().T),
        }
    }
    xj = jnp.asarray(x.numpy())

    def loss(lora):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, xj) ** 2)

    y_j = wrapped.apply({"params": params, "lora": lora}, xj)
    grads = jax.grad(loss)(lora)
    return [
        row(
            "QLoRA nf4 forward: jax_lora vs PEFT on a bitsandbytes Linear4bit (MiniLM query)",
            y_j,
            y_t,
        ),
        row(
            "QLoRA nf4 grads of A, B: jax_lora vs PEFT on bitsandbytes Linear4bit",
            [grads["fc"]["a"].T, grads["fc"]["b"].T],
            [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad],
            FWD_TOL,
        ),
    ]


ALL["qlora_nf4_minilm"] = qlora_nf4_minilm
ALL["qlora_nf4_smollm2"] = qlora_nf4_smollm2
ALL["qlora_peft_bnb_linear4bit_minilm"] = qlora_peft_bnb_linear4bit_minilm
