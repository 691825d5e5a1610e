"""Where SmolLM2-135M's NF4 perplexity gap comes from (issue #13 item 6): held-out perplexity
and weight error of the linear kernels re-quantized per variant (NF4 block 64 / 32, with and
without double quantization, int4, an affine 4-bit grid), per tensor kind (q/k/v/o/gate/up/down)
and per group of layers, all on the same fp32 base (the GGUF's Q4_1 decoded).

    python benchmarks/quant_error.py                  # 30 layers, 4 windows of 256 tokens
    python benchmarks/quant_error.py --windows 8 --json

Every variant is evaluated as a dense fp32 tree (``dequantize(quantize(w))``: the values a
`QArray` layer computes with), so one compiled forward serves all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quant as bench  # benchmarks/quant.py

from jax_lora import quant
from jax_lora.lm import llama
from jax_lora.lm import loss as lm_loss

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: name -> (qtype, block, double_quant); ``affine4_b32``: 16 levels ``d q + m`` per block of 32
#: (GGUF Q4_1, re-encoded by gguf's own quantizer), the grid the base was stored on
VARIANTS = {
    "nf4_b64": ("nf4", 64, False),
    "nf4_b64_dq": ("nf4", 64, True),
    "nf4_b32": ("nf4", 32, False),
    "nf4_b32_dq": ("nf4", 32, True),
    "int4_b64": ("int4", 64, False),
    "int4_b32": ("int4", 32, False),
    "affine4_b32": ("q4_1", 32, False),
}

#: references outside `jax_lora.quantize` (numpy here): ``nf4_b32_mse``: NF4 codes with each
#: block's scale searched (``c * absmax``, ``c`` in 0.70 ... 1.00) for the least squared error,
#: the best a per-block-scaled NF4 encoder can do (bitsandbytes' format: codes + one float
#: scale per block); ``q4_1_dq8``: the GGUF's own Q4_1 codes kept, its fp16 ``d`` and ``m``
#: each stored as 8-bit codes of the dynamic map in blocks of 256 (minus their mean), as our
#: double quantization does: 4 + 8/32 + 8/32 bits = 0.563 bytes/weight
EXTRA = ("nf4_b32_mse", "q4_1_dq8")

_dequantized = jax.jit(quant.dequantize_array)


MSE_GRID = np.linspace(0.70, 1.0, 16)  # candidate scales of `nf4_mse`, times the block absmax


def nf4_mse(w: np.ndarray, block: int = 32, grid: np.ndarray = MSE_GRID) -> np.ndarray:
    """NF4 of ``w: (..., in, out)`` (blocks along ``in``), each block's scale the ``c * absmax``
    of least squared error over ``grid``, dequantized."""
    ax = w.ndim - 2
    b = w.reshape(w.shape[:ax] + (w.shape[ax] // block, block) + w.shape[ax + 1 :])
    absmax = np.abs(b).max(axis=ax + 1, keepdims=True)
    absmax = np.where(absmax == 0, np.float32(1), absmax)
    table = quant.NF4_TABLE
    mid = (table[:-1] + table[1:]) / np.float32(2)
    best, best_err = None, None
    for c in grid.astype(np.float32):
        s = absmax * c
        deq = table[np.searchsorted(mid, np.clip(b / s, -1, 1))] * s
        err = ((deq - b) ** 2).sum(axis=ax + 1, keepdims=True)
        if best is None:
            best, best_err = deq, err
        else:
            better = err < best_err
            best = np.where(better, deq, best)
            best_err = np.minimum(err, best_err)
    return best.reshape(w.shape)


def dq8(v: np.ndarray) -> np.ndarray:
    """``v: (n,)`` through 8-bit dynamic-map codes in blocks of 256, minus the mean (our double
    quantization's recipe), decoded."""
    offset = v.mean(dtype=np.float32)
    x = v - offset
    n2 = -(-len(x) // 256)
    xp = np.pad(x, (0, n2 * 256 - len(x))).reshape(n2, 256)
    a2 = np.abs(xp).max(axis=1, keepdims=True)
    code = quant.dynamic_map()
    mid = (code[:-1] + code[1:]) / np.float32(2)
    dec = code[np.searchsorted(mid, xp / np.where(a2 == 0, 1, a2))] * a2
    return dec.reshape(-1)[: len(x)] + offset


def q4_1_dq8(q: quant.QArray) -> np.ndarray:
    """A Q4_1 kernel ``(in, out)`` (blocks along ``in``) with ``d`` and ``m`` through `dq8`."""
    d = np.asarray(q.scales, np.float32)
    m = np.asarray(q.mins, np.float32)
    codes = np.asarray(q.codes)
    nib = np.stack([codes >> 4, codes & 15], axis=1).reshape(-1, codes.shape[1])  # (in, out)
    d8 = dq8(d.T.reshape(-1)).reshape(d.T.shape).T  # out-major, as `_dq_layout`
    m8 = dq8(m.T.reshape(-1)).reshape(m.T.shape).T
    rep = lambda a: np.repeat(a, q.block, axis=0)  # noqa: E731
    return rep(d8) * nib.astype(np.float32) + rep(m8)


def requantized(w: np.ndarray, variant: str) -> np.ndarray:
    """``w`` (``(layers, in, out)`` or ``(in, out)``) through ``variant``'s quantizer and back."""
    if variant == "nf4_b32_mse":
        return nf4_mse(w, 32)
    qtype, block, dq = VARIANTS[variant]
    if qtype == "q4_1":  # gguf's encoder takes one matrix at a time
        if w.ndim == 3:
            return np.stack([requantized(x, variant) for x in w])
        return np.asarray(_dequantized(quant.quantize_array(w, qtype)))
    return np.asarray(_dequantized(quant.quantize_array(w, qtype, block=block, double_quant=dq)))


def dithered(w: np.ndarray, step: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``w`` plus uniform noise of one quantization step per element (``step``: ``w``'s shape)."""
    return w + (rng.random(w.shape, np.float32) - np.float32(0.5)) * step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--chunk", type=int, default=lm_loss.default_chunk)
    p.add_argument("--no-groups", action="store_true", help="skip the per-layer-group runs")
    p.add_argument("--variants", default=",".join((*VARIANTS, *EXTRA)))
    p.add_argument("--no-kinds", action="store_true", help="skip the one-kind-alone runs")
    p.add_argument("--no-dither", action="store_true", help="skip the uniform-noise runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    cfg, qparams, tok = bench.load_quantized(a.layers)
    args = argparse.Namespace(scan=True, quant_embed=False)
    base = bench.make_base("lora_fp32", qparams, cfg, args)  # the Q4_1 decoded, stacked
    # the Q4_1 step ``d`` of every kernel element (the GGUF's own block scales), stacked
    steps, q41 = {}, {}
    for k in KINDS:
        group = "self_attn" if k[0] in "qkvo" else "mlp"
        per_layer = []
        for i in range(cfg.num_hidden_layers):
            q = qparams["model"][f"layers_{i}"][group][k]["kernel"]
            s = np.repeat(np.asarray(q.scales, np.float32), q.block, axis=q.axis)
            per_layer.append(s)
        steps[k] = np.stack(per_layer)
        if "q4_1_dq8" in a.variants.split(","):
            q41[k] = np.stack(
                [
                    q4_1_dq8(qparams["model"][f"layers_{i}"][group][k]["kernel"])
                    for i in range(cfg.num_hidden_layers)
                ]
            )
    del qparams
    test = bench.play_ids(tok, bench.HELD_OUT)
    n = a.seq + 1
    starts = np.linspace(0, len(test) - n, a.windows).astype(int)
    windows = np.stack([test[s : s + n] for s in starts])
    model = llama.Llama(cfg, scan_layers=True)

    @jax.jit
    def nll(params, w):
        return lm_loss.llama_token_nll(
            model.apply, {"params": params}, w[None, :-1], w[None, 1:], chunk=a.chunk or None
        ).mean()

    def ppl(params) -> float:
        return float(np.exp(np.mean([float(nll(params, w)) for w in windows])))

    layers = base["model"]["layers"]
    kernels = {
        k: np.asarray(layers["self_attn" if k[0] in "qkvo" else "mlp"][k]["kernel"]) for k in KINDS
    }

    def with_kernels(new: dict) -> dict:
        """``base`` with the kernels of ``new`` (kind -> stacked array) replaced."""
        out = jax.tree.map(lambda x: x, base)
        for k, v in new.items():
            out["model"]["layers"]["self_attn" if k[0] in "qkvo" else "mlp"][k]["kernel"] = (
                jax.device_put(v)
            )
        return out

    def log(what):
        print(f"[{time.perf_counter() - t0:7.1f} s] {what}", file=sys.stderr, flush=True)

    report: dict = {"layers": cfg.num_hidden_layers, "seq": a.seq, "windows": a.windows}
    report["ppl"] = {"fp32": ppl(base)}
    log(f"fp32 {report['ppl']['fp32']:.3f}")
    # relative weight error ||W' - W|| / ||W|| per variant, kind and layer
    rel = {}
    requant = {}
    names = [v for v in a.variants.split(",") if v]
    for v in names:
        requant[v] = q41 if v == "q4_1_dq8" else {k: requantized(kernels[k], v) for k in KINDS}
        rel[v] = {
            k: (
                np.linalg.norm((requant[v][k] - kernels[k]).reshape(len(kernels[k]), -1), axis=1)
                / np.linalg.norm(kernels[k].reshape(len(kernels[k]), -1), axis=1)
            ).tolist()
            for k in KINDS
        }
        report["ppl"][v] = ppl(with_kernels(requant[v]))
        log(f"{v} {report['ppl'][v]:.3f}")
        if v not in ("nf4_b64", "nf4_b32"):
            del requant[v]
    del q41
    report["rel_weight_error"] = rel
    # each kind alone re-quantized to nf4 (block 64, then 32): its share of the gap
    report["ppl_one_kind"] = {}
    for v in () if a.no_kinds else ("nf4_b64", "nf4_b32"):
        report["ppl_one_kind"][v] = {}
        for k in KINDS:
            report["ppl_one_kind"][v][k] = ppl(with_kernels({k: requant[v][k]}))
            log(f"{v} {k} only {report['ppl_one_kind'][v][k]:.3f}")
    # groups of layers alone re-quantized to nf4 block 64
    if not a.no_groups and "nf4_b64" in requant:
        n_l = cfg.num_hidden_layers
        groups = [(i, min(i + 6, n_l)) for i in range(0, n_l, 6)]
        report["ppl_layer_group_nf4_b64"] = {}
        for lo, hi in groups:
            new = {}
            for k in KINDS:
                w = kernels[k].copy()
                w[lo:hi] = requant["nf4_b64"][k][lo:hi]
                new[k] = w
            report["ppl_layer_group_nf4_b64"][f"{lo}-{hi - 1}"] = ppl(with_kernels(new))
            log(f"layers {lo}-{hi - 1} {report['ppl_layer_group_nf4_b64'][f'{lo}-{hi - 1}']:.3f}")
    # what an error of Q4_1's own size costs: uniform noise of one Q4_1 step (the error the
    # GGUF's own rounding made, in distribution), and of half a step
    rng = np.random.default_rng(0)
    report["ppl_dither"] = {}
    for frac in () if a.no_dither else (1.0, 0.5):
        noisy = {k: dithered(kernels[k], steps[k] * np.float32(frac), rng) for k in KINDS}
        rel_noise = {
            k: float(np.linalg.norm(noisy[k] - kernels[k]) / np.linalg.norm(kernels[k]))
            for k in KINDS
        }
        report["ppl_dither"][str(frac)] = {"ppl": ppl(with_kernels(noisy)), "rel": rel_noise}
        log(f"dither {frac} step: {report['ppl_dither'][str(frac)]['ppl']:.3f}")
        del noisy
    fp = report["ppl"]["fp32"]
    print(f"SmolLM2-135M, {cfg.num_hidden_layers} layers, {a.windows} windows of {a.seq} tokens")
    print(f"{'variant':<14} {'ppl':>8} {'/ fp32':>7} {'rel err W (median over kernels)':>32}")
    for v in ("fp32", *names):
        errs = [] if v == "fp32" else [e for k in KINDS for e in rel[v][k]]
        med = f"{np.median(errs):32.4f}" if errs else f"{'-':>32}"
        print(f"{v:<14} {report['ppl'][v]:8.3f} {report['ppl'][v] / fp:7.3f} {med}")
    for v, d in report["ppl_one_kind"].items():
        print(f"{v}, one kind alone: " + ", ".join(f"{k} {x / fp:.3f}" for k, x in d.items()))
    for g, x in report.get("ppl_layer_group_nf4_b64", {}).items():
        print(f"nf4_b64 on layers {g} alone: {x / fp:.3f}")
    for f, d in report["ppl_dither"].items():
        r = np.mean(list(d["rel"].values()))
        print(f"uniform noise of {f} Q4_1 step (rel err {r:.4f}): {d['ppl'] / fp:.3f}")
    if a.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
