"""``jax-lora``: fine-tune a Llama-family language model with LoRA from the command line.

    jax-lora train --model smollm2 --data DIR --iters 200 --out run1
    jax-lora generate --adapter run1 --prompt "To be, or not to be"
    jax-lora eval --adapter run1 --data DIR
    jax-lora fuse --adapter run1 --out merged-hf
    jax-lora export --adapter run1 --format peft|gguf --out DIR_OR_FILE

Needs the ``[lm]`` extra (``pip install 'jax_lora[lm]'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

TRAIN_HELP = {
    "model": "GGUF file, HF safetensors folder (Llama family), or 'smollm2' (packaged)",
    "data": "folder with train.jsonl/valid.jsonl ({text}, {prompt,completion}, {messages}) or "
    ".txt files; or one such file",
    "out": "run folder: run.json + orbax checkpoints",
    "iters": "training iterations",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (default 2 x rank)",
    "targets": "projections to adapt: a regex of names (q_proj|v_proj) or 'all'",
    "dropout": "LoRA dropout",
    "lr": "Adam learning rate",
    "batch": "sequences per iteration",
    "seq": "tokens per sequence",
    "seed": "init and data-order seed",
    "val_every": "validation loss every N iterations",
    "val_batches": "validation batches",
    "save_every": "checkpoint every N iterations",
    "report_every": "progress line every N iterations",
    "keep": "checkpoints kept",
    "resume": "continue the run in --out from its last checkpoint",
    "overwrite": "replace the run in --out",
    "mesh": "data-parallel over this many devices (the batch is split; weights replicated)",
    "simulate_devices": "CPU only: pretend to have this many devices (XLA host platform)",
    "quant": "QLoRA: keep the frozen base kernels quantized: nf4, nf4_dq (double-quantized "
    "scales), nf4_b32_dq (blocks of 32, double-quantized scales), int4, int8, or gguf (a GGUF "
    "model file's own Q4_0/Q4_1/Q8_0 blocks)",
    "fine_tune_type": "lora, or dora (a trained magnitude per output: jax_lora use_dora)",
}


def _train_parser(sub) -> None:
    from .lm.models import QUANTS
    from .lm.train import FINE_TUNE_TYPES, TrainArgs

    choices = {"quant": QUANTS, "fine_tune_type": FINE_TUNE_TYPES}

    p = sub.add_parser("train", help="train a LoRA adapter", argument_default=argparse.SUPPRESS)
    p.add_argument("-c", "--config", help="YAML file of these options (flags override it)")
    for f in dataclasses.fields(TrainArgs):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_ = f"{TRAIN_HELP[f.name]} (default {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_)
        else:
            kind = {"alpha": float, "data": str, "quant": str}.get(f.name, type(default))
            p.add_argument(flag, type=kind, choices=choices.get(f.name), help=help_)


def _train_args(ns: argparse.Namespace):
    from .lm.train import TrainArgs, UserError

    given = {k: v for k, v in vars(ns).items() if k not in ("command", "config")}
    values: dict = {}
    if getattr(ns, "config", None):
        import yaml

        with open(ns.config) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{ns.config}: expected a mapping of option: value")
        names = {f.name for f in dataclasses.fields(TrainArgs)}
        for k, v in raw.items():
            key = str(k).replace("-", "_")
            if key not in names:
                raise UserError(
                    f"{ns.config}: unknown option {k!r}; known: {', '.join(sorted(names))}"
                )
            values[key] = v
    values.update(given)
    return TrainArgs(**values)


def _adapter_parser(sub, name: str, help_: str, *, adapter_required: bool = True):
    p = sub.add_parser(name, help=help_)
    p.add_argument("--adapter", required=adapter_required, help="a `jax-lora train --out` folder")
    p.add_argument("--model", default=None, help="base model (default: the one it was trained on)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jax-lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)

    p = _adapter_parser(sub, "eval", "loss and perplexity with and without the adapter")
    p.add_argument(
        "--data", default=None, help="a file (all of it), or a data folder (default: training's)"
    )
    p.add_argument("--split", default="valid", choices=("train", "valid", "test"))
    p.add_argument("--seq", type=int, default=None, help="tokens per window (default: as trained)")
    p.add_argument("--batches", type=int, default=8, help="windows of --seq tokens, x batch")

    p = _adapter_parser(sub, "generate", "generate text", adapter_required=False)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temp", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")

    p = _adapter_parser(sub, "fuse", "merge the adapter into the weights (HF safetensors)")
    p.add_argument("--out", required=True, help="new folder for the merged HF model")

    p = _adapter_parser(sub, "export", "write the adapter for PEFT or llama.cpp")
    p.add_argument("--format", required=True, choices=("peft", "gguf"))
    p.add_argument("--out", required=True, help="PEFT folder, or the .gguf file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return parser


def _eval(ns) -> None:

    from .lm import data as data_lib
    from .lm.train import eval_loss, evaluate, load_adapter

    ad = load_adapter(ns.adapter, ns.model)
    seq = ns.seq or ad.run["seq"]
    batch = ad.run["batch"]
    data = ns.data or ad.run["data"]
    if ns.data and os.path.isfile(ns.data):  # a file of its own: all of it
        stream = data_lib.load_file(ns.data, ad.loaded.tokenizer)
    else:
        stream = data_lib.load_split(data, ns.split, ad.loaded.tokenizer)
    data_lib.check_length(stream, seq, ns.split)
    params = ad.loaded.params
    # the base model: the adapter switched off (zeroing a DoRA magnitude would zero W)
    plain = ad.wrapped.clone(enabled=False)
    for name, model in (("base", plain), (f"adapter (step {ad.step})", ad.wrapped)):
        loss_fn = eval_loss(model, params)
        loss, ppl = evaluate(
            loss_fn, ad.lora, stream, count=ns.batches * batch, batch=batch, seq=seq
        )
        print(f"{name}: {ns.split} loss {loss:.4f}  perplexity {ppl:.3f}")


def _generate(ns) -> None:
    from .lm import llama, models
    from .lm.generate import generate
    from .lm.train import UserError, load_adapter

    if ns.adapter:
        ad = load_adapter(ns.adapter, ns.model)
        loaded, apply = ad.loaded, ad.wrapped.apply
        variables = {"params": loaded.params, "lora": ad.lora}
    elif ns.model:
        loaded = models.load(ns.model)
        apply, variables = llama.Llama(loaded.cfg).apply, {"params": loaded.params}
    else:
        raise UserError("pass --adapter DIR (or --model M for the base model)")
    tok = loaded.tokenizer
    text = ns.prompt
    if ns.chat:
        if tok.chat_template is None:
            raise UserError(f"--chat: {loaded.source} has no chat template")
        text = tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    ids = generate(
        apply,
        variables,
        tok.encode(text),
        ns.max_tokens,
        context=loaded.context,
        temperature=ns.temp,
        top_p=ns.top_p,
        seed=ns.seed,
        eos_id=tok.eos_id,
    )
    if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
    print(ns.prompt + tok.decode(ids))


def _fuse(ns) -> None:
    import jax.numpy as jnp

    from . import merge
    from .lm import models
    from .lm.train import UserError, load_adapter

    if os.path.exists(ns.out):
        raise UserError(f"--out {ns.out} exists; fuse writes a new folder")
    ad = load_adapter(ns.adapter, ns.model)
    variables = {"params": ad.loaded.params, "lora": ad.lora}
    merged = merge(variables, ad.wrapped, jnp.zeros((1, 2), jnp.int32))
    tensors = models.params_to_hf(merged, ad.loaded.cfg)
    models.write_hf_dir(ns.out, ad.loaded.cfg, tensors, ad.loaded.tokenizer)
    print(f"merged model (HF safetensors, LlamaForCausalLM): {ns.out}")


def _export(ns) -> None:
    from .lm import llama
    from .lm.export import write_gguf_adapter
    from .lm.train import UserError, load_adapter
    from .peft import export_peft

    ad = load_adapter(ns.adapter, ns.model)
    if ns.format == "peft":
        names = export_peft(
            ns.out,
            ad.lora,
            ad.config,
            torch_name=llama.torch_name,
            base_model_name_or_path=ad.loaded.source,
            overwrite=ns.overwrite,
        )
        print(f"PEFT adapter ({len(names)} modules): {ns.out}")
    else:
        if ad.config.use_dora:
            raise UserError(
                f"--format gguf: {ns.adapter} is a DoRA adapter (--fine-tune-type dora); a "
                "llama.cpp LoRA adapter cannot carry its magnitude vector: export --format peft, "
                "or merge it into the weights with `jax-lora fuse`"
            )
        if os.path.exists(ns.out) and not ns.overwrite:
            raise UserError(f"--out {ns.out} exists: pass --overwrite to replace it")
        names = write_gguf_adapter(ns.out, ad.lora, ad.config, ad.loaded.cfg)
        print(f"GGUF LoRA adapter ({len(names)} tensors): {ns.out}")


def main(argv: list[str] | None = None) -> int:
    """The ``jax-lora`` entry point; returns the exit status."""
    from .lm.train import UserError, train

    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "train":
            args = _train_args(ns)
            if args.simulate_devices:  # read by XLA when the backend starts (not yet here)
                flag = f"--xla_force_host_platform_device_count={args.simulate_devices}"
                os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
            train(args)
        else:
            {"eval": _eval, "generate": _generate, "fuse": _fuse, "export": _export}[ns.command](ns)
    except (UserError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        print(f"jax-lora {ns.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


def main_exit() -> None:
    """Console-script entry point: `main` with its status as the exit code."""
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
