"""Text generation with a KV cache: one forward pass over the prompt, then one token at a time
(greedy, or temperature + top-p sampling)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def sample(logits: jax.Array, key: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """``logits: (vocab,)`` -> a token id: argmax at ``temperature == 0``, else sampled from the
    smallest set of tokens whose probability reaches ``top_p``."""
    if temperature <= 0:
        return jnp.argmax(logits)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits)
        probs = jax.nn.softmax(logits[order])
        keep = jnp.cumsum(probs) - probs < top_p  # always keeps the most likely token
        logits = (
            jnp.full_like(logits, -jnp.inf).at[order].set(jnp.where(keep, logits[order], -jnp.inf))
        )
    return jax.random.categorical(key, logits)


def generate(
    apply: Callable[..., Any],
    variables: dict,
    prompt: list[int],
    max_tokens: int,
    *,
    context: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> list[int]:
    """New tokens after ``prompt`` (at most ``max_tokens``; stops after ``eos_id``).

    ``apply(variables, ids (1, t), cache_index=i, cache_len=L, mutable=["cache"])`` is the
    model's apply (e.g. `jax_lora.wrap`'s): the prompt is run once, then each new token reads
    the keys and values of the earlier ones from the cache.
    """
    if not prompt:
        raise ValueError("the prompt is empty: pass at least one token")
    length = min(len(prompt) + max_tokens, context)
    if len(prompt) >= length:
        raise ValueError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")

    @partial(jax.jit, static_argnames="cache_len")
    def step(cache, ids, index, key, cache_len):
        logits, state = apply(
            {**variables, "cache": cache},
            ids,
            cache_index=index,
            cache_len=cache_len,
            mutable=["cache"],
        )
        tok = sample(logits[0, -1], key, temperature=temperature, top_p=top_p)
        return state["cache"], tok

    key = jax.random.key(seed)
    ids = jnp.asarray([prompt], jnp.int32)
    cache, tok = step({}, ids, jnp.int32(0), key, length)
    out = [int(tok)]
    for i in range(len(prompt), length - 1):
        if eos_id is not None and out[-1] == eos_id:
            break
        key = jax.random.fold_in(key, i)
        cache, tok = step(cache, jnp.asarray([[out[-1]]], jnp.int32), jnp.int32(i), key, length)
        out.append(int(tok))
    return out


def greedy_uncached(apply_fn: Callable, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by recomputing the whole sequence each step (the reference for tests).
    One fixed-length buffer (one compile): causal attention ignores the padding after ``i``."""
    buf = np.zeros((1, len(prompt) + max_tokens), np.int32)
    buf[0, : len(prompt)] = prompt
    for i in range(len(prompt), buf.shape[1]):
        buf[0, i] = int(jnp.argmax(apply_fn(buf)[0, i - 1]))
    return buf[0, len(prompt) :].tolist()
