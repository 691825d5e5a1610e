"""The seed's experiment: fix a classifier's worst class with LoRA, on scikit-learn's digits.

Train a deliberately over-sized MLP briefly on 8x8 handwritten digits, find the class it gets
wrong most often, then LoRA-fine-tune only on that class's training images (plus a small replay
of the rest so the others are not forgotten) and report per-class accuracy before/after,
trainable parameters, that `jax_lora.disabled()` restores the original predictions exactly,
and that the merged model predicts what the wrapped one does.

    python examples/digits.py [--seed 0] [--rank 4] [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jax_lora


class MLP(nn.Module):
    """Over-sized for 64-pixel inputs on purpose: 64 -> 1000 -> 2000 -> 10."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(1000, name="fc1")(x))
        x = nn.relu(nn.Dense(2000, name="fc2")(x))
        return nn.Dense(10, name="head")(x)


def per_class_accuracy(logits: jax.Array, y: np.ndarray) -> np.ndarray:
    pred = np.asarray(jnp.argmax(logits, -1))
    return np.array([(pred[y == c] == c).mean() for c in range(10)])


def train(loss_fn, params, tx, batches, steps):
    @jax.jit
    def step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    loss = None
    for i in range(steps):
        xb, yb = batches(i)
        params, state, loss = step(params, state, xb, yb)
    return params, float(loss)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (data split, init, batches)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=8.0, help="LoRA alpha (scale = alpha / rank)")
    p.add_argument("--pretrain-steps", type=int, default=60, help="brief full training steps")
    p.add_argument("--steps", type=int, default=200, help="LoRA fine-tuning steps")
    p.add_argument("--batch", type=int, default=64, help="batch size")
    args = p.parse_args()
    t0 = time.perf_counter()

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.4, random_state=args.seed, stratify=y
    )
    rng = np.random.default_rng(args.seed)

    model = MLP()
    params = model.init(jax.random.key(args.seed), x_tr[:1])["params"]

    def base_loss(params, xb, yb):
        logits = model.apply({"params": params}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def batches_from(xs, ys):
        return lambda i: (lambda idx: (xs[idx], ys[idx]))(rng.integers(0, len(xs), args.batch))

    params, _ = train(
        base_loss, params, optax.sgd(0.05), batches_from(x_tr, y_tr), args.pretrain_steps
    )
    before = per_class_accuracy(model.apply({"params": params}, x_te), y_te)
    worst = int(np.argmin(before))

    # LoRA on every Dense, the head too (as the seed; targets=None would leave the head out);
    # train on the worst class, with a little replay of the others.
    config = jax_lora.LoraConfig(rank=args.rank, alpha=args.alpha, targets="fc1|fc2|head")
    wrapped = jax_lora.wrap(model, config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(args.seed + 1), {"params": params}, x_tr[:1])
    focus = np.flatnonzero(y_tr == worst)
    rest = np.flatnonzero(y_tr != worst)

    def lora_batches(i):
        idx = np.concatenate(
            [rng.choice(focus, args.batch // 2), rng.choice(rest, args.batch // 2)]
        )
        return x_tr[idx], y_tr[idx]

    def lora_loss(lora, xb, yb):  # the fast path: differentiate the factors only
        logits = wrapped.apply({"params": params, "lora": lora}, xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    lora, final_loss = train(lora_loss, lora, optax.adam(1e-3), lora_batches, args.steps)
    variables = {"params": params, "lora": lora}
    after = per_class_accuracy(wrapped.apply(variables, x_te), y_te)

    with jax_lora.disabled():
        off = np.asarray(jnp.argmax(wrapped.apply(variables, x_te), -1))
    orig = np.asarray(jnp.argmax(model.apply({"params": params}, x_te), -1))
    merged = jax_lora.merge(variables, config)
    merged_pred = np.asarray(jnp.argmax(model.apply({"params": merged}, x_te), -1))
    lora_pred = np.asarray(jnp.argmax(wrapped.apply(variables, x_te), -1))

    report = jax_lora.param_report(variables)
    full = sum(t.size for t in jax.tree.leaves(params))
    print(
        f"digits: {len(x_tr)} train / {len(x_te)} test images, worst class after pre-training: {worst}"
    )
    print(
        f"LoRA rank {args.rank} on every Dense, {args.steps} Adam steps, final loss {final_loss:.3f}"
    )
    print()
    print("class | before | after  | change")
    print("------+--------+--------+-------")
    for c in range(10):
        mark = "  <- fine-tuned" if c == worst else ""
        print(f"  {c}   | {before[c]:6.3f} | {after[c]:6.3f} | {after[c] - before[c]:+.3f}{mark}")
    print(f" all  | {np.mean(orig == y_te):6.3f} | {np.mean(lora_pred == y_te):6.3f} |")
    print()
    print(report)
    print(
        f"full fine-tuning would train {full:,} params: LoRA trains {report.trainable / full:.2%} of that"
    )
    print(f"disabled LoRA == original predictions: {np.array_equal(off, orig)}")
    print(f"merged model == LoRA model predictions: {np.array_equal(merged_pred, lora_pred)}")
    print(f"done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
