"""Serving many LoRA adapters at once: a mixed batch (each row its own adapter, `adapter_ids=`)
vs the same batch with one adapter, vs one forward per adapter, and vs PEFT's mixed-batch
forward (``adapter_names=``) on the same model and CPU.

The model is benchmarks/models.py's GPT decoder, forward only (serving), rank-8 LoRA on all
its linear layers (q, k, v, o, fc1, fc2). The server holds 64 adapters; ``mixed<k>`` is one
jitted call on a batch whose rows use k distinct adapters (compiled once for every k). The
baselines:

- ``single``: the same batch through a one-adapter model (`jax_lora.wrap` with a LoraConfig);
- ``separate``: a model without mixed batches serves a formed batch with 16 adapters by
  running the whole batch once per adapter and keeping each adapter's rows (16 forwards);
- ``grouped``: the rows regrouped into one batch per adapter (16 forwards of batch/16 rows);
- ``peft``: PEFT, 16 adapters loaded, ``model(tokens, adapter_names=[...])``, torch no_grad.

Every configuration is warmed up, then timed in interleaved rounds (one call of each per
round); throughput ratios of medians measured side by side in this one process.

    python benchmarks/multi_adapter.py            # issue defaults: d 768, batch 64, seq 128
    python benchmarks/multi_adapter.py --quick    # small model, < 2 min on 2 cores
    python benchmarks/multi_adapter.py --json     # last line: one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # jax_lora
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/models.py
from models import TARGETS, GPTConfig, LinenGPT, add_size_args, torch_gpt

import jax_lora

QUICK = {"vocab": 2048, "d_model": 256, "heads": 4, "d_ff": 1024, "layers": 2, "seq": 64}
N_ADAPTERS = 64
MIXES = (1, 4, 16, 64)
TARGET = {"mixed16_over_single": 0.80, "mixed16_over_separate": 5.0, "mixed16_vs_peft": 1.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_size_args(p, batch=64)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds")
    p.add_argument(
        "--quick", action="store_true", help="small model, 3 rounds: < 2 min on 2 idle cores"
    )
    p.add_argument("--no-torch", action="store_true", help="skip PEFT")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
        a.repeats = min(a.repeats, 3)
    if a.batch % 16:
        p.error("--batch must be a multiple of 16 (16 adapters share it evenly)")
    return a


def _ids(batch: int, k: int) -> np.ndarray:
    """Row ids using exactly ``k`` distinct adapters, spread over the batch."""
    return np.arange(batch) % k * (N_ADAPTERS // k)


def build(a) -> tuple[dict, GPTConfig]:
    """``{name: call()}``: each call serves the whole batch once and blocks until done."""
    cfg = GPTConfig(a.vocab, a.d_model, a.heads, a.d_ff, a.layers, a.seq)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (a.batch, cfg.seq)), jnp.int32)
    model = LinenGPT(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    lora_cfg = jax_lora.LoraConfig(
        rank=a.rank, alpha=2 * a.rank, targets=rf".*/({'|'.join(TARGETS)})"
    )
    single = jax_lora.wrap(model, lora_cfg)
    like = jax.eval_shape(
        lambda: jax_lora.init_lora(single, jax.random.key(0), {"params": params}, tokens)
    )
    leaves, treedef = jax.tree.flatten(like)

    def random_tree(i: int):
        keys = jax.random.split(jax.random.key(100 + i), len(leaves))
        return treedef.unflatten(
            [
                0.02 * jax.random.normal(k, t.shape, t.dtype)
                for k, t in zip(keys, leaves, strict=True)
            ]
        )

    names = [f"a{i}" for i in range(N_ADAPTERS)]
    trees = {n: random_tree(i) for i, n in enumerate(names)}
    multi = jax_lora.wrap(model, {n: lora_cfg for n in names})
    v_multi = {"params": params, "lora": trees}
    calls: dict = {}

    one = jax.jit(lambda lora, t: single.apply({"params": params, "lora": lora}, t))
    calls["single"] = lambda: one(trees["a0"], tokens).block_until_ready()

    mixed = jax.jit(lambda v, t, ids: multi.apply(v, t, adapter_ids=ids))
    for k in MIXES:
        ids = jnp.asarray(_ids(a.batch, k), jnp.int32)
        calls[f"mixed{k}"] = lambda ids=ids: mixed(v_multi, tokens, ids).block_until_ready()

    ids16 = _ids(a.batch, 16)
    used = sorted(set(ids16.tolist()))

    def separate():  # the whole batch once per adapter, each adapter's rows kept
        out = jnp.zeros((a.batch, cfg.seq, cfg.vocab), jnp.float32)
        for i in used:
            y = one(trees[names[i]], tokens)
            out = jnp.where(jnp.asarray(ids16 == i)[:, None, None], y, out)
        out.block_until_ready()

    calls["separate"] = separate
    groups = [(trees[names[i]], tokens[np.flatnonzero(ids16 == i)]) for i in used]

    def grouped():  # one smaller batch per adapter
        for y in [one(lora, t) for lora, t in groups]:
            y.block_until_ready()

    calls["grouped"] = grouped
    if not a.no_torch:
        calls["peft"] = _peft(a, cfg, np.asarray(tokens), [names[i] for i in ids16])
    return calls, cfg


def _peft(a, cfg: GPTConfig, tokens: np.ndarray, row_names: list[str]):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    pcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(TARGETS))
    distinct = list(dict.fromkeys(row_names))
    tm = get_peft_model(torch_gpt(cfg), pcfg, adapter_name=distinct[0])
    for n in distinct[1:]:
        tm.add_adapter(n, pcfg)
    with torch.no_grad():
        for name, p in tm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    tm.eval()
    tt = torch.from_numpy(np.array(tokens)).long()

    def run():
        with torch.no_grad():
            tm(tt, adapter_names=row_names)

    return run


def measure(calls: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call; one warm-up (compiles) and interleaved timed rounds."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(a) -> dict:
    calls, cfg = build(a)
    sec = measure(calls, a.repeats)
    tokens = a.batch * cfg.seq
    tps = {k: tokens / s for k, s in sec.items()}
    result: dict = {
        "config": {
            "d_model": cfg.d_model,
            "layers": cfg.layers,
            "batch": a.batch,
            "seq": cfg.seq,
            "rank": a.rank,
            "adapters_held": N_ADAPTERS,
            "repeats": a.repeats,
            "backend": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
    }
    for k in MIXES:
        result[f"mixed{k}_over_single"] = round(tps[f"mixed{k}"] / tps["single"], 3)
    result["mixed16_over_separate"] = round(tps["mixed16"] / tps["separate"], 3)
    result["mixed16_over_grouped"] = round(tps["mixed16"] / tps["grouped"], 3)
    result["mixed16_vs_peft"] = round(tps["mixed16"] / tps["peft"], 3) if "peft" in tps else None
    result["targets_met"] = {
        k: (result[k] >= t if result[k] is not None else None) for k, t in TARGET.items()
    }
    return result


def report(r: dict) -> None:
    c = r["config"]
    print(
        f"GPT d={c['d_model']} layers={c['layers']} batch={c['batch']} seq={c['seq']} "
        f"rank={c['rank']}, {c['adapters_held']} adapters held, {c['backend']} "
        f"({c['cores']} cores), median of {c['repeats']} rounds"
    )
    for k, v in r["tokens_per_s"].items():
        print(f"  {k:<10} {v:>12,.0f} tokens/s")
    for k in [*(f"mixed{m}_over_single" for m in MIXES), "mixed16_over_separate"]:
        print(f"  {k:<24} {r[k]}")
    print(f"  {'mixed16_over_grouped':<24} {r['mixed16_over_grouped']}")
    print(f"  {'mixed16_vs_peft':<24} {r['mixed16_vs_peft']}")
    print(
        "  targets: " + ", ".join(f"{k} >= {t}: {r['targets_met'][k]}" for k, t in TARGET.items())
    )


if __name__ == "__main__":
    args = parse_args()
    res = main(args)
    report(res)
    if args.json:
        print(json.dumps(res))
