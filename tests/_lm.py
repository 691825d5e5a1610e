"""A tiny random Llama (2 layers, hidden 32) written by the tests themselves as an HF
safetensors folder and as a GGUF file, with a byte-level tokenizer and a chat template."""

from __future__ import annotations

import json
import os

import numpy as np

from jax_lora.lm import llama, models

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CFG = llama.LlamaConfig(
    vocab_size=260,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    max_position_embeddings=64,
)


def tokenizer(chat: bool = True) -> models.Tokenizer:
    """Byte-level BPE (256 byte tokens, one merge "th") + 3 specials; eos ``<|im_end|>`` (258)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers import models as tm

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate([*alphabet, "th"])}
    tok = Tokenizer(tm.BPE(vocab=vocab, merges=[("t", "h")]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    special = {"eos_token": "<|im_end|>"}
    return models.Tokenizer(tok, 258, CHAT_TEMPLATE if chat else None, special)


def tensors(seed: int = 0, cfg: llama.LlamaConfig = CFG) -> dict[str, np.ndarray]:
    """Random HF-layout weights (scaled so that logits are O(1) and argmax ties are unlikely)."""
    import jax

    shapes = jax.eval_shape(
        lambda: llama.Llama(cfg).init(jax.random.key(0), np.zeros((1, 2), np.int32))
    )["params"]
    g = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: (0.3 * g.standard_normal(s.shape)).astype(np.float32), shapes)
    out = models.params_to_hf(params, cfg)
    for k in out:
        if k.endswith("norm.weight"):
            out[k] = (1 + 0.1 * g.standard_normal(out[k].shape)).astype(np.float32)
    return out


def write_hf(directory: str, seed: int = 0, *, chat: bool = True, **cfg_changes) -> str:
    import dataclasses

    cfg = dataclasses.replace(CFG, **cfg_changes)
    models.write_hf_dir(directory, cfg, tensors(seed, cfg), tokenizer(chat))
    return directory


def write_gguf(path: str, seed: int = 0, *, qtype: str | None = None) -> str:
    """``qtype`` (``"q8_0"``, ...): the matrices in that GGML type (the embedding too)."""
    models.write_gguf_model(path, CFG, tensors(seed), tokenizer(), qtype=qtype)
    return path


def write_data(directory: str, kind: str = "text", n: int = 40) -> str:
    """``train.jsonl``/``valid.jsonl`` of ``kind`` records (text, completion or chat)."""
    os.makedirs(directory, exist_ok=True)
    g = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "the", "cat", "sat", "on", "a", "mat"]
    for split, count in (("train", n), ("valid", max(4, n // 4))):
        with open(os.path.join(directory, f"{split}.jsonl"), "w") as f:
            for _ in range(count):
                s = " ".join(g.choice(words, 12))
                rec = {
                    "text": {"text": s},
                    "completion": {"prompt": s[:20], "completion": s[20:]},
                    "chat": {
                        "messages": [
                            {"role": "user", "content": s[:20]},
                            {"role": "assistant", "content": s[20:]},
                        ]
                    },
                }[kind]
                f.write(json.dumps(rec) + "\n")
    return directory
