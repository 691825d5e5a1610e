"""QLoRA benchmark: LoRA (rank 8, all linear layers) on SmolLM2-135M with its frozen base kept
as fp32, bf16, int8, nf4, nf4 + double quantization, or the GGUF's own Q4_1 blocks; and qwix
0.1.8's own nf4 QLoRA (``qwix_nf4``: `LoraRule(weight_qtype="nf4", tile_size=64)`) on the same
model, for ``vs_qwix_qlora_rss`` / ``vs_qwix_qlora_step`` (ours over qwix's).

    python benchmarks/quant.py            # the real model: 30 layers, seq 256, batch 4
    python benchmarks/quant.py --quick    # 2 layers, seq 64, batch 2: < 3 min on 2 cores
    python benchmarks/quant.py --json     # last line: one JSON object

Each configuration's peak RSS comes from a fresh process (load + base + 2 steps); step times
are measured interleaved in one process (median over rounds); perplexity on a held-out play
(never trained on) before fine-tuning (the quantization error) and after ``--steps`` steps.
Every base is built from the GGUF one tensor at a time, so no process holds a second copy.
``--remat`` (default; ``--no-remat`` to turn off) rematerialises each decoder layer in every
configuration alike; ``step_memory_mib`` is the compiled step's ``memory_analysis()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax_lora
from jax_lora import quant
from jax_lora.lm import llama
from jax_lora.lm.packages import shakespeare_play

CONFIGS = ("lora_fp32", "lora_bf16", "int8", "nf4", "nf4_dq", "gguf_q4_1", "qwix_nf4")
TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"
TRAIN_PLAYS = ("macbeth", "hamlet", "othello")
HELD_OUT = "twelfth_night"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="2 layers, seq 64, batch 2, 3 steps")
    p.add_argument("--layers", type=int, default=None, help="first N layers (default all)")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=40, help="LoRA steps before the 2nd perplexity")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rematerialise each decoder layer in every configuration alike (default on)",
    )
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.seq, a.batch, a.steps, a.rounds, a.eval_windows = 2, 64, 2, 3, 3, 2
    return a


def load_quantized(n_layers: int | None):
    """(cfg, params with the GGUF's Q4_1/Q8_0 matrices as QArrays, tokenizer)."""
    cfg, tensors, reader = llama.read_gguf(llama.smollm2_gguf(), keep_quantized=True)
    if n_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=n_layers)
        keep = {f"model.layers.{i}." for i in range(n_layers)}
        tensors = {
            k: v
            for k, v in tensors.items()
            if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)
        }
    return cfg, llama.params_from_hf(tensors, cfg), llama.tokenizer_from_gguf(reader)


def make_base(name: str, params, cfg=None, a=None):
    """The frozen base of configuration ``name``, converted one tensor at a time."""
    if name == "qwix_nf4":
        return qwix_base(cfg, params, a)

    def one(path, x):
        is_kernel = path[-1].key == "kernel"
        if name == "gguf_q4_1":
            return x
        w = quant.dequantize_array(x) if quant.is_quantized(x) else x
        if name == "lora_fp32":
            return w
        if name == "lora_bf16":
            return w.astype(jnp.bfloat16)
        if not is_kernel:  # QLoRA quantizes the linear layers; embedding and norms stay
            return w
        qtype = "nf4" if name.startswith("nf4") else name
        return quant.quantize_array(w, qtype, double_quant=name == "nf4_dq")

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=quant.is_quantized)


def qwix_model(cfg, a):
    """qwix 0.1.8's QLoRA: `LoraRule` with ``weight_qtype="nf4"``, blocks of 64 along the
    contraction (``tile_size``) as in the paper, on the same Llama and targets."""
    import qwix

    rule = qwix.LoraRule(
        module_path=TARGETS, rank=a.rank, alpha=2 * a.rank, weight_qtype="nf4", tile_size=64
    )
    return qwix.apply_lora_to_model(llama.Llama(cfg, remat=a.remat), qwix.LoraProvider([rule]))


def qwix_base(cfg, params, a):
    """``params`` (GGUF QArrays or arrays) -> qwix's nf4 base plus its LoRA factors (flat dict,
    ``<kernel>_lora_a`` / ``_lora_b``: ``a`` small random, ``b`` zero), one tensor at a time."""
    import flax.traverse_util as tu
    import qwix

    abstract = jax.eval_shape(
        qwix_model(cfg, a).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
    )["params"]
    base = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=quant.is_quantized)[0]:
        key = tuple(k.key for k in path)
        w = quant.dequantize_array(x) if quant.is_quantized(x) else x
        base[key] = tu.flatten_dict(qwix.quantize_params(tu.unflatten_dict({key: w}), abstract))[
            key
        ]
    lora = {}
    for i, (key, s) in enumerate(sorted(tu.flatten_dict(abstract).items())):
        if key[-1].endswith("_lora_a"):
            lora[key] = 0.01 * jax.random.normal(jax.random.key(i), s.shape, s.dtype)
        elif key[-1].endswith("_lora_b"):
            lora[key] = jnp.zeros(s.shape, s.dtype)
    return {"base": tu.unflatten_dict(base), "lora": lora}


def _build_qwix(cfg, base, a, tx):
    import flax.traverse_util as tu

    model = qwix_model(cfg, a)

    def nll(lora, base, batch):
        p = tu.unflatten_dict(tu.flatten_dict(base["base"]) | lora)
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch[:, 1:]
        ).mean()

    @jax.jit
    def step(lora, opt, base, batch):
        loss, g = jax.value_and_grad(nll)(lora, base, batch)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    lora = base["lora"]
    return step, jax.jit(nll), lora, tx.init(lora)


def play_ids(tok, name: str) -> np.ndarray:
    with open(shakespeare_play(name), encoding="utf-8", errors="replace") as f:
        text = f.read()
    return np.array(tok.encode(text[max(text.find("ACT I"), 0) :]).ids, np.int32)


def build(name: str, cfg, params, a):
    """(step, nll, lora, opt_state) for one configuration."""
    if name == "qwix_nf4":
        return _build_qwix(cfg, params, a, optax.adam(1e-3))
    model = llama.Llama(cfg, remat=a.remat)
    config = jax_lora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=TARGETS)
    wrapped = jax_lora.wrap(model, config)
    ids = jnp.zeros((1, 8), jnp.int32)
    lora = jax.jit(lambda p: jax_lora.init_lora(wrapped, jax.random.key(0), {"params": p}, ids))(
        params
    )
    tx = optax.adam(1e-3)

    def nll(lora, params, batch):
        logits = wrapped.apply({"params": params, "lora": lora}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), batch[:, 1:]
        ).mean()

    @jax.jit
    def step(lora, opt, params, batch):
        loss, g = jax.value_and_grad(nll)(lora, params, batch)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    return step, jax.jit(nll), lora, tx.init(lora)


def peak_rss_mib() -> float:
    """This process's peak RSS: /proc's VmHWM starts afresh at exec (getrusage's ru_maxrss
    would report the parent's peak in a child)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(a) -> None:
    cfg, qparams, _ = load_quantized(a.layers)
    if a.rss_of == "baseline":  # imports, the XLA runtime and the GGUF reader: shared by all
        print(peak_rss_mib())
        return
    params = make_base(a.rss_of, qparams, cfg, a)
    del qparams
    step, _, lora, opt = build(a.rss_of, cfg, params, a)
    batch = np.zeros((a.batch, a.seq + 1), np.int32)
    for _ in range(2):
        lora, opt, loss = step(lora, opt, params, batch)
        jax.block_until_ready(loss)
    print(peak_rss_mib())


def rss_of(name: str, a) -> float:
    args = [sys.executable, os.path.abspath(__file__), "--rss-of", name]
    args += ["--seq", str(a.seq), "--batch", str(a.batch), "--rank", str(a.rank)]
    args += ["--layers", str(a.layers)] if a.layers else []
    args += ["--remat" if a.remat else "--no-remat"]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(a) -> dict:
    if a.rss_of:
        rss_child(a)
        return {}
    names = [n for n in a.configs.split(",") if n]
    cfg, qparams, tok = load_quantized(a.layers)
    train = np.concatenate([play_ids(tok, n) for n in TRAIN_PLAYS])
    test = play_ids(tok, HELD_OUT)
    n = a.seq + 1
    starts = np.linspace(0, len(test) - n, a.eval_windows).astype(int)
    eval_batch = np.stack([test[s : s + n] for s in starts])
    rng = np.random.default_rng(0)
    bases = {name: make_base(name, qparams, cfg, a) for name in names}
    runs = {name: build(name, cfg, bases[name], a) for name in names}

    def ppl(name, lora):
        nll = runs[name][1]
        return float(np.exp(np.mean([float(nll(lora, bases[name], b[None])) for b in eval_batch])))

    report: dict = {"configs": names, "layers": cfg.num_hidden_layers, "seq": a.seq}
    report.update(batch=a.batch, rank=a.rank, remat=a.remat)
    kernels = [
        x
        for path, x in jax.tree_util.tree_flatten_with_path(qparams, is_leaf=quant.is_quantized)[0]
        if path[-1].key == "kernel"
    ]
    n_weights = sum(int(np.prod(k.shape)) for k in kernels)

    def kernel_bytes(tree) -> int:  # qwix's kernels are WithAux(QArray(qvalue, scale)) leaves
        return sum(
            quant.nbytes(x) if quant.is_quantized(x) else x.size * x.dtype.itemsize
            for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
            if any(getattr(k, "key", None) == "kernel" for k in path)
        )

    report["bytes_per_weight"] = {name: kernel_bytes(bases[name]) / n_weights for name in names}
    state = {name: list(runs[name][2:]) for name in names}
    batch0 = np.zeros((a.batch, n), np.int32)

    def memory(name):  # the compiled step's own accounting (MiB): what peak RSS is made of
        m = runs[name][0].lower(*state[name], bases[name], batch0).compile().memory_analysis()
        keys = ("temp", "argument", "output", "alias", "generated_code")
        return {k: getattr(m, f"{k}_size_in_bytes", 0) / 2**20 for k in keys} if m else None

    report["step_memory_mib"] = {name: memory(name) for name in names}
    report["ppl_before"] = {name: ppl(name, state[name][0]) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    losses = {name: [] for name in names}
    total = max(a.steps, a.rounds + 1)
    for i in range(total):  # interleaved: each round runs every configuration once
        batch = np.stack([train[s : s + n] for s in rng.integers(0, len(train) - n, a.batch)])
        for name in names:
            step = runs[name][0]
            if i >= a.steps and i > a.rounds:
                continue
            t0 = time.perf_counter()
            lora, opt, loss = step(*state[name], bases[name], batch)
            jax.block_until_ready(loss)
            if i > 0:  # the first call compiles
                times[name].append(time.perf_counter() - t0)
            if i < a.steps:
                state[name] = [lora, opt]
                losses[name].append(float(loss))
    report["step_s"] = {name: float(np.median(times[name])) for name in names}
    report["ppl_after"] = {name: ppl(name, state[name][0]) for name in names}
    rss = {} if a.no_rss else {name: rss_of(name, a) for name in ["baseline", *names]}
    report["peak_rss_mib"] = rss or None
    net = {k: v - rss["baseline"] for k, v in rss.items() if k != "baseline"} if rss else {}
    report["peak_rss_net_mib"] = net or None

    def ratio(d, x, y):
        return d[x] / d[y] if d and x in d and y in d else None

    report.update(
        nf4_bytes_per_weight=report["bytes_per_weight"].get("nf4"),
        nf4_dq_bytes_per_weight=report["bytes_per_weight"].get("nf4_dq"),
        qlora_rss_over_lora_fp32=ratio(rss, "nf4", "lora_fp32"),
        qlora_rss_over_lora_fp32_net=ratio(net, "nf4", "lora_fp32"),
        qlora_step_over_lora_bf16=ratio(report["step_s"], "nf4", "lora_bf16"),
        nf4_ppl_over_fp32=ratio(report["ppl_before"], "nf4", "lora_fp32"),
        nf4_ppl_after_over_fp32=ratio(report["ppl_after"], "nf4", "lora_fp32"),
        vs_qwix_qlora_rss=ratio(rss, "nf4", "qwix_nf4"),  # ours over qwix's: < 1 is better
        vs_qwix_qlora_step=ratio(report["step_s"], "nf4", "qwix_nf4"),
    )
    print(
        f"SmolLM2-135M, {cfg.num_hidden_layers} layers, seq {a.seq}, batch {a.batch}, "
        f"rank {a.rank} on all linear layers; {a.steps} steps"
    )
    print(f"{'config':<10} {'bytes/w':>8} {'step s':>8} {'RSS MiB':>8} {'ppl 0':>8} {'ppl N':>8}")
    for name in names:
        r = f"{rss[name]:8.0f}" if rss else f"{'-':>8}"  # peak, not net
        print(
            f"{name:<10} {report['bytes_per_weight'][name]:8.3f} {report['step_s'][name]:8.3f} "
            f"{r} {report['ppl_before'][name]:8.2f} {report['ppl_after'][name]:8.2f}"
        )
    for name, m in report["step_memory_mib"].items():
        if m:
            print(
                f"{name:<10} compiled step: temp {m['temp']:.0f} MiB, args {m['argument']:.0f} MiB"
            )
    if rss:
        print(f"process baseline (imports, XLA, GGUF reader): {rss['baseline']:.0f} MiB")
    if a.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(parse_args())
