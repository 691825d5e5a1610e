"""Training data for ``jax-lora``: jsonl records (``{"text"}``, ``{"prompt","completion"}``,
``{"messages"}``) or plain ``.txt`` files, tokenized into one stream of ``ids`` with a loss
``mask``, and cut into ``(batch, seq + 1)`` windows that depend only on ``(seed, step)``."""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np

from .models import Tokenizer

FORMATS = '{"text": ...}, {"prompt": ..., "completion": ...} or {"messages": [{"role", "content"}]}'
#: share of a plain-text training set held out for validation when there is no valid.txt
TEXT_VALID_SHARE = 0.1


@dataclasses.dataclass
class Stream:
    """``ids: (n,)`` int32 tokens and ``mask: (n,)`` bool: True where token i is a loss target."""

    ids: np.ndarray
    mask: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.ids)


def _record(rec: object, where: str, tok: Tokenizer) -> tuple[list[int], list[bool]]:
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: a {type(rec).__name__}, expected one JSON object: {FORMATS}")
    keys = set(rec)

    def text(key):
        v = rec[key]
        if not isinstance(v, str):
            raise ValueError(f"{where}: {key!r} is a {type(v).__name__}, expected a string")
        return v

    if keys == {"text"}:
        ids = tok.encode(text("text"))
        return ids, [True] * len(ids)
    if keys == {"prompt", "completion"}:
        p, c = tok.encode(text("prompt")), tok.encode(text("completion"))
        return p + c, [False] * len(p) + [True] * len(c)
    if keys == {"messages"}:
        msgs = rec["messages"]
        if (
            not isinstance(msgs, list)
            or not msgs
            or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
        ):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        if tok.chat_template is None:
            raise ValueError(
                f"{where}: a {{'messages'}} record needs the model's chat template and this model "
                'has none; write {"prompt", "completion"} or {"text"} records instead'
            )
        full = tok.render_chat(msgs, add_generation_prompt=False)
        if msgs[-1]["role"] == "assistant" and len(msgs) > 1:
            prompt = tok.render_chat(msgs[:-1], add_generation_prompt=True)
            if full.startswith(prompt):  # loss on the last assistant reply only
                p, c = tok.encode(prompt), tok.encode(full[len(prompt) :])
                return p + c, [False] * len(p) + [True] * len(c)
        ids = tok.encode(full)
        return ids, [True] * len(ids)
    raise ValueError(f"{where}: has keys {sorted(keys)}; expected {FORMATS}")


def read_jsonl(path: str, tok: Tokenizer) -> Stream:
    """Every record, each followed by the end-of-sequence token (when the model has one)."""
    ids: list[int] = []
    mask: list[bool] = []
    n = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{where}: not valid JSON ({e.msg}, column {e.colno}); each line must be "
                    f"one JSON object: {FORMATS}"
                ) from None
            i, m = _record(rec, where, tok)
            if tok.eos_id is not None:
                i, m = [*i, tok.eos_id], [*m, True]
            ids += i
            mask += m
            n += 1
    if n == 0:
        raise ValueError(f"{path} is empty: no records ({FORMATS}, one per line)")
    return Stream(np.asarray(ids, np.int32), np.asarray(mask, bool), path)


def read_text(paths: list[str], tok: Tokenizer) -> Stream:
    parts = []
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            ids = tok.encode(f.read())
        parts.append(ids + ([tok.eos_id] if tok.eos_id is not None and ids else []))
    ids = np.asarray([i for part in parts for i in part], np.int32)
    if len(ids) == 0:
        raise ValueError(f"no text in {', '.join(paths)}")
    return Stream(ids, np.ones(len(ids), bool), ", ".join(paths))


def load_file(path: str, tok: Tokenizer) -> Stream:
    """All of one ``.jsonl`` or text file (e.g. for ``jax-lora eval --data FILE``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r}: no such file")
    return read_jsonl(path, tok) if path.endswith(".jsonl") else read_text([path], tok)


def load_split(data: str, split: str, tok: Tokenizer) -> Stream:
    """``split`` ("train", "valid" or "test") of ``data``: a folder with ``<split>.jsonl``, a
    folder of ``.txt`` files (``valid.txt``/``test.txt`` if present, else the last 10 % of the
    training text), or one ``.jsonl``/``.txt`` file (its own validation share for "valid")."""
    if not os.path.exists(data):
        raise FileNotFoundError(f"--data {data!r}: no such file or folder")
    if os.path.isfile(data):
        if data.endswith(".jsonl"):
            return read_jsonl(data, tok)
        return _text_split(read_text([data], tok), split)
    file = os.path.join(data, f"{split}.jsonl")
    if os.path.exists(file):
        return read_jsonl(file, tok)
    if glob.glob(os.path.join(data, "*.jsonl")):
        raise FileNotFoundError(
            f"{data} has no {split}.jsonl (the folder needs train.jsonl and valid.jsonl)"
        )
    own = os.path.join(data, f"{split}.txt")
    if split != "train" and os.path.exists(own):
        return read_text([own], tok)
    texts = sorted(
        p
        for p in glob.glob(os.path.join(data, "*.txt"))
        if os.path.basename(p) not in ("valid.txt", "test.txt")
    )
    if not texts:
        raise ValueError(
            f"{data}: no training data: expected train.jsonl/valid.jsonl ({FORMATS}) or .txt files"
        )
    stream = read_text(texts, tok)
    if split == "train" and os.path.exists(os.path.join(data, "valid.txt")):
        return stream
    return _text_split(stream, split)


def _text_split(stream: Stream, split: str) -> Stream:
    cut = int(len(stream) * (1 - TEXT_VALID_SHARE))
    sl = slice(0, cut) if split == "train" else slice(cut, None)
    return Stream(stream.ids[sl], stream.mask[sl], f"{stream.source} [{split} share]")


def check_length(stream: Stream, seq: int, what: str) -> None:
    if len(stream) < seq + 1:
        raise ValueError(
            f"{what} data ({stream.source}) has {len(stream)} tokens, fewer than --seq + 1 = "
            f"{seq + 1}: add data or lower --seq"
        )
    if not stream.mask[1:].any():
        raise ValueError(f"{what} data ({stream.source}) has no tokens to train on (all prompt)")


def batch(stream: Stream, *, seed: int, step: int, batch: int, seq: int):
    """Training windows for ``step``: ``ids (batch, seq + 1)``, ``mask (batch, seq)`` (targets).
    A function of ``(seed, step)`` only, so a resumed run draws the same batches."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq, batch)
    return _windows(stream, starts, seq)


def eval_windows(stream: Stream, *, count: int, seq: int):
    """``count`` evenly spaced windows over the whole stream (deterministic)."""
    starts = np.unique(np.linspace(0, len(stream) - seq - 1, count).astype(int))
    return _windows(stream, starts, seq)


def _windows(stream: Stream, starts, seq):
    ids = np.stack([stream.ids[s : s + seq + 1] for s in starts])
    mask = np.stack([stream.mask[s + 1 : s + seq + 1] for s in starts])
    return ids, mask
