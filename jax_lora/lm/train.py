"""The ``jax-lora train`` loop and its run folder: ``<out>/run.json`` (what was trained: model,
data, LoRA and optimizer settings) and ``<out>/checkpoints/<step>`` (`AdapterCheckpointer`)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..checkpoint import AdapterCheckpointer
from ..config import LoraConfig
from ..linen import init_lora, wrap
from . import data as data_lib
from . import llama, models
from . import loss as lm_loss

ALL_TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"
#: settings that define a run: resuming with a different value is refused
IDENTITY = ("model", "data", "rank", "alpha", "targets", "dropout", "seq", "batch", "lr", "seed")
IDENTITY += ("quant", "fine_tune_type")
#: what a run.json written before a setting existed means by its absence
_ABSENT = {"quant": None, "fine_tune_type": "lora"}
FINE_TUNE_TYPES = ("lora", "dora")


class UserError(Exception):
    """A problem the user can fix; the CLI prints it without a traceback."""


@dataclasses.dataclass
class TrainArgs:
    model: str = "smollm2"
    data: str | None = None
    out: str = "adapters"
    iters: int = 1000
    rank: int = 8
    alpha: float | None = None  # default 2 * rank
    targets: str = "q_proj|v_proj"
    fine_tune_type: str = "lora"
    dropout: float = 0.0
    lr: float = 1e-3
    batch: int = 4
    seq: int = 256
    seed: int = 0
    val_every: int = 200
    val_batches: int = 4
    save_every: int = 100
    report_every: int = 10
    keep: int = 3
    resume: bool = False
    overwrite: bool = False
    quant: str | None = None
    mesh: int = 1
    simulate_devices: int = 0


def lora_config(run: dict) -> LoraConfig:
    t = ALL_TARGETS if run["targets"] == "all" else run["targets"]
    return LoraConfig(
        rank=run["rank"],
        alpha=run["alpha"],
        targets=rf".*/self_attn/({t})|.*/mlp/({t})",
        dropout=run["dropout"],
        use_dora=run.get("fine_tune_type", "lora") == "dora",
    )


def identity(a: TrainArgs) -> dict[str, Any]:
    d = dataclasses.asdict(a)
    d["model"] = models.resolve(a.model)
    d["data"] = os.path.abspath(a.data)
    d["alpha"] = float(2 * a.rank if a.alpha is None else a.alpha)
    return {k: d[k] for k in IDENTITY}


def _check_out(out: str, run: dict, a: TrainArgs) -> None:
    """Refuse an ``--out`` that holds something else; clear it with ``--overwrite``."""
    run_file = os.path.join(out, "run.json")
    if not os.path.exists(out) or not os.listdir(out):
        if a.resume:
            raise UserError(f"--resume: {out} holds no run to resume")
        return
    if not os.path.exists(run_file):
        raise UserError(
            f"--out {out} is not empty and holds no jax-lora run (no run.json): choose another "
            "--out (it is never deleted)"
        )
    with open(run_file) as f:
        old = json.load(f)
    if a.overwrite:
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
        os.remove(run_file)
        return
    diff = {k: (old.get(k, _ABSENT.get(k)), run[k]) for k in IDENTITY}
    diff = {k: (o, n) for k, (o, n) in diff.items() if o != n}
    if diff:
        text = "; ".join(f"{k}: {o!r} there, {n!r} now" for k, (o, n) in diff.items())
        raise UserError(
            f"--out {out} holds a different run ({text}): pass --overwrite to replace it, or "
            "another --out"
        )
    if not a.resume:
        step = AdapterCheckpointer(os.path.join(out, "checkpoints")).latest_step()
        raise UserError(
            f"--out {out} already holds this run (last checkpoint: step {step}): pass --resume "
            "to continue it or --overwrite to start again"
        )


def nll(wrapped, params, lora, ids, mask, dropout_key=None):
    """Mean next-token negative log-likelihood over the target tokens (``mask``); LoRA dropout
    runs when a ``dropout_key`` is given."""
    rngs = None if dropout_key is None else {"dropout": dropout_key}
    v = {"params": params, "lora": lora}  # logits a block of tokens at a time (lm/loss.py)
    loss = lm_loss.llama_token_nll(wrapped.apply, v, ids[:, :-1], ids[:, 1:], rngs=rngs)
    m = mask.astype(loss.dtype)
    return (loss * m).sum() / jnp.maximum(m.sum(), 1.0), m.sum()


def eval_loss(wrapped, params):
    """``(lora, ids, mask) -> (mean nll, token count)`` on the base ``params``, compiled once.
    The base goes into the executable as an argument: a jitted closure over it would bake the
    whole model into the executable as a constant, a second copy of the base in memory."""
    jitted = jax.jit(lambda p, lo, ids, mask: nll(wrapped, p, lo, ids, mask))
    return functools.partial(jitted, params)


def make_step(wrapped, tx):
    """The jitted training step ``(params, lora, opt, ids, mask, dropout_key) -> (lora, opt,
    loss)``; ``ids: (batch, seq + 1)``, ``mask: (batch, seq)``."""

    @jax.jit
    def step(params, lora, opt, ids, mask, key):
        (loss, _), g = jax.value_and_grad(
            lambda lo: nll(wrapped, params, lo, ids, mask, key), has_aux=True
        )(lora)
        with jax.numpy_dtype_promotion("standard"):  # optax's adam: decay ** int32 count
            u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    return step


def evaluate(loss_fn, lora, stream: data_lib.Stream, *, count: int, batch: int, seq: int):
    """-> (loss, perplexity) over ``count`` evenly spaced windows of ``stream``."""
    ids, mask = data_lib.eval_windows(stream, count=count, seq=seq)
    total, n = 0.0, 0.0
    for i in range(0, len(ids), batch):
        loss, k = loss_fn(lora, ids[i : i + batch], mask[i : i + batch])
        total, n = total + float(loss) * float(k), n + float(k)
    loss = total / max(n, 1.0)
    return loss, float(np.exp(loss))


def _data_parallel(a: TrainArgs):
    """``--mesh N``: a 1-D ``("data",)`` mesh of N devices -> ``put(tree, split)``; None for 1."""
    if a.mesh <= 1:
        return None
    have = len(jax.devices())
    if have < a.mesh:
        hint = f" (on CPU: --simulate-devices {a.mesh})" if jax.default_backend() == "cpu" else ""
        raise UserError(f"--mesh {a.mesh} needs {a.mesh} devices, have {have}{hint}")
    if a.batch % a.mesh:
        raise UserError(f"--batch {a.batch} does not split over --mesh {a.mesh} devices")
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    auto = (jax.sharding.AxisType.Auto,)  # XLA propagates the activations' shardings
    mesh = jax.make_mesh((a.mesh,), ("data",), axis_types=auto, devices=jax.devices()[: a.mesh])

    def put(tree, split):
        return jax.device_put(tree, NamedSharding(mesh, P("data") if split else P()))

    return put


def _eta(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(a: TrainArgs, log=print) -> int:
    """Run (or resume) training; returns the last step saved."""
    if a.data is None:
        raise UserError("--data is required (a folder with train.jsonl/valid.jsonl, or .txt files)")
    for k in ("iters", "rank", "batch", "seq", "val_every", "save_every", "report_every", "keep"):
        if getattr(a, k) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    if a.quant is not None and a.quant not in models.QUANTS:
        raise UserError(f"--quant {a.quant!r}: expected one of {', '.join(models.QUANTS)}")
    if a.fine_tune_type not in FINE_TUNE_TYPES:
        raise UserError(
            f"--fine-tune-type {a.fine_tune_type!r}: expected one of {', '.join(FINE_TUNE_TYPES)}"
        )
    out = os.path.abspath(a.out)
    run = identity(a)
    _check_out(out, run, a)

    loaded = models.load(a.model, quant=a.quant)
    if a.seq > loaded.context:
        raise UserError(
            f"--seq {a.seq} is beyond the model's context ({loaded.context} positions, "
            f"{loaded.source}): use --seq {loaded.context} or less"
        )
    tok = loaded.tokenizer
    train_data = data_lib.load_split(a.data, "train", tok)
    valid_data = data_lib.load_split(a.data, "valid", tok)
    data_lib.check_length(train_data, a.seq, "training")
    data_lib.check_length(valid_data, a.seq, "validation")
    log(
        f"model {loaded.source}: {loaded.cfg.num_hidden_layers} layers, hidden "
        f"{loaded.cfg.hidden_size}, base {a.quant or 'fp32'}; train {len(train_data):,} tokens, "
        f"valid {len(valid_data):,}"
    )

    config = lora_config(run)
    wrapped = wrap(llama.Llama(loaded.cfg), config)
    params = loaded.params
    lora = jax.jit(lambda p, x: init_lora(wrapped, jax.random.key(a.seed), {"params": p}, x))(
        params, np.zeros((1, 2), np.int32)
    )
    if not jax.tree.leaves(lora):
        raise UserError(f"--targets {a.targets!r} matches no layer of the model")
    tx = optax.adam(a.lr)
    opt = tx.init(lora)

    ck_dir = os.path.join(out, "checkpoints")
    os.makedirs(out, exist_ok=True)
    ck = AdapterCheckpointer(ck_dir, max_to_keep=a.keep)
    start = 0
    if a.resume:
        r = ck.restore(lora, opt_state_like=opt)
        lora, opt, start = r.lora, r.opt_state, r.step
        log(f"resumed from step {start} ({ck_dir})")
    else:
        tmp = os.path.join(out, ".run.json.tmp")
        with open(tmp, "w") as f:
            json.dump(run, f, indent=1)
        os.replace(tmp, os.path.join(out, "run.json"))
    put = _data_parallel(a)
    if put is not None:  # replicated weights, factors and state; batches split over devices
        params, lora, opt = (put(t, False) for t in (params, lora, opt))
    if start >= a.iters:
        log(f"nothing to do: the run is at step {start}, --iters {a.iters}")
        ck.close()
        return start

    step = make_step(wrapped, tx)
    loss_fn = eval_loss(wrapped, params)
    saved = ck.latest_step() or 0
    done = start

    def save(i):
        nonlocal saved
        try:
            ck.save(i, lora, config, opt_state=opt)
            saved = i
        except OSError as e:
            _save_failed(e, ck)

    dropout_key = jax.random.key(a.seed + 1)
    losses: list[float] = []
    t_last, tokens = time.perf_counter(), 0
    t_start = t_last
    try:
        for i in range(start + 1, a.iters + 1):
            ids, mask = data_lib.batch(train_data, seed=a.seed, step=i, batch=a.batch, seq=a.seq)
            # the dropout key, like the batch, depends on (seed, step) only: resume is exact
            key = jax.random.fold_in(dropout_key, i) if a.dropout > 0 else None
            if put is not None:
                ids, mask = put(ids, True), put(mask, True)
            lora, opt, loss = step(params, lora, opt, ids, mask, key)
            done = i
            losses.append(float(loss))
            tokens += ids.shape[0] * a.seq
            if i % a.report_every == 0 or i == a.iters:
                now = time.perf_counter()
                per_iter = (now - t_start) / (i - start)
                log(
                    f"iter {i}/{a.iters}  loss {np.mean(losses):.3f}  "
                    f"{tokens / (now - t_last):,.0f} tok/s  ETA {_eta(per_iter * (a.iters - i))}",
                    flush=True,
                )
                losses, t_last, tokens = [], now, 0
            if i % a.val_every == 0 or i == a.iters:
                vl, ppl = evaluate(
                    loss_fn,
                    lora,
                    valid_data,
                    count=a.val_batches * a.batch,
                    batch=a.batch,
                    seq=a.seq,
                )
                log(f"iter {i}/{a.iters}  val loss {vl:.3f}  val ppl {ppl:.2f}", flush=True)
                t_last = time.perf_counter()
            if i % a.save_every == 0 or i == a.iters:
                save(i)
    except KeyboardInterrupt:
        try:  # a save the interrupt cut short (or one still writing) finishes first
            ck.wait()
        except OSError as e:
            _save_failed(e, ck)
        if done > (ck.latest_step() or 0):
            save(done)
        _close(ck)
        log(f"interrupted at step {done}: saved {ck_dir}/{done}; continue with --resume")
        raise SystemExit(130) from None
    _close(ck)
    log(f"saved adapter: {ck_dir}/{saved}")
    return saved


def _close(ck: AdapterCheckpointer) -> None:
    try:
        ck.close()
    except OSError as e:
        _save_failed(e, ck)


def _save_failed(e: OSError, ck: AdapterCheckpointer) -> None:
    with contextlib.suppress(OSError):
        ck.close()
    last = ck.latest_step()
    kept = f"the last complete checkpoint, step {last}, is intact" if last else "none was kept"
    raise UserError(
        f"saving a checkpoint to {ck.directory} failed: {e.strerror or e}; {kept}. Free space "
        "and continue with --resume"
    ) from e


# --- using a trained adapter ---------------------------------------------------------------


@dataclasses.dataclass
class Adapter:
    loaded: models.Loaded
    wrapped: Any
    lora: Any
    config: LoraConfig
    step: int
    run: dict


def load_adapter(directory: str, model: str | None = None) -> Adapter:
    """The latest checkpoint of a ``jax-lora train --out`` folder, with its base model."""
    run_file = os.path.join(directory, "run.json")
    if not os.path.exists(run_file):
        raise UserError(f"--adapter {directory}: no run.json; pass a `jax-lora train --out` folder")
    with open(run_file) as f:
        run = json.load(f)
    loaded = models.load(model or run["model"], quant=run.get("quant"))
    config = lora_config(run)
    wrapped = wrap(llama.Llama(loaded.cfg), config)
    like = jax.eval_shape(
        lambda p: init_lora(
            wrapped, jax.random.key(0), {"params": p}, jnp.zeros((1, 2), jnp.int32)
        ),
        loaded.params,
    )
    ck = AdapterCheckpointer(os.path.join(directory, "checkpoints"))
    try:
        r = ck.restore(like)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    return Adapter(loaded, wrapped, r.lora, r.config, r.step, run)
