"""Memory-lean next-token cross-entropy for a language model's head: the logits are made one
chunk of tokens at a time, so one ``(chunk, vocab)`` block is live instead of ``(batch, seq,
vocab)`` (201 MB in fp32 for SmolLM2 at batch 4, seq 256 -- and autodiff keeps several)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

#: tokens per logits block: 128 x 49152 fp32 logits are 25 MB
default_chunk = 128

#: compile options that let `jax.checkpoint` / ``Llama(remat=True)`` save memory on XLA:CPU: its
#: default concurrency-optimised scheduler runs the backward pass's recomputations early, right
#: after the forward, so the rematerialised activations are all live at once again (SmolLM2, 4
#: layers, chunked loss: temporaries 461 MiB with remat, 135 MiB with this option). The same as
#: ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``, for one function:
#: ``jax.jit(step, compiler_options=...)``; a CPU-only debug option, ignored by other backends.
cpu_remat_compiler_options: dict[str, Any] = {
    "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
}


def chunked_cross_entropy(
    hidden: jax.Array,
    weight: jax.Array,
    labels: jax.Array,
    *,
    transposed: bool = True,
    chunk: int = default_chunk,
) -> jax.Array:
    """Per-token ``-log softmax(hidden @ head)[label]``, ``(batch, seq)`` fp32, equal to
    ``optax.softmax_cross_entropy_with_integer_labels(logits.astype(f32), labels)`` with
    ``logits = hidden @ head``, but computed over blocks of ``chunk`` tokens in a
    `jax.lax.scan` whose body is rematerialised (`jax.checkpoint`): forward and backward each
    hold one ``(chunk, vocab)`` block of logits. Gradients reach ``hidden`` and, when it is
    differentiated (a trained tied embedding), ``weight``.

    Args:
      hidden: ``(batch, seq, d)`` the final hidden states (after the last norm).
      weight: the head: ``(vocab, d)`` (a tied embedding table, ``transposed=True``) or
        ``(d, vocab)`` (a Dense kernel, ``transposed=False``); or a frozen `jax_lora.QArray`
        of either, dequantized inside each block (forward and backward).
      labels: ``(batch, seq)`` int token ids.
      chunk: tokens per block (the last block is padded).

    >>> h, w = jnp.ones((2, 3, 4)), jnp.zeros((10, 4))
    >>> chunked_cross_entropy(h, w, jnp.zeros((2, 3), jnp.int32), chunk=4).shape
    (2, 3)
    """
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(
            f"hidden {hidden.shape} must be (batch, seq, d) and labels {labels.shape} (batch, seq)"
        )
    d = hidden.shape[-1]
    if weight.ndim != 2 or weight.shape[1 if transposed else 0] != d:
        want = "(vocab, d)" if transposed else "(d, vocab)"
        raise ValueError(f"head weight {weight.shape} is not {want} for hidden size d={d}")
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    b, t = labels.shape
    n = b * t
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(labels.reshape(n), (0, pad)).reshape(-1, chunk)
    dtype = jnp.promote_types(hidden.dtype, weight.dtype)
    from ..quant import is_quantized

    # contract d in place: ``weight.T`` would be a transposed copy of the table (113 MB)
    dims = (((1,), (1 if transposed else 0,)), ((), ()))

    @jax.checkpoint
    def block(h, y):
        if is_quantized(weight):  # frozen: dequantized here, a slice of the vocabulary at a time
            logits = _quantized_head_logits(h.astype(dtype), weight, transposed, dims, dtype)
        else:
            logits = jax.lax.dot_general(h.astype(dtype), weight.astype(dtype), dims)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)

    _, losses = jax.lax.scan(lambda c, hy: (c, block(*hy)), None, (h, y))
    return losses.reshape(-1)[:n].reshape(b, t)


#: rows of the vocabulary dequantized at a time from a quantized head (4096 x 576 fp32: 9 MB)
head_rows = 4096


def _quantized_head_logits(h, q, transposed: bool, dims, dtype) -> jax.Array:
    """``h @ head`` for a frozen `jax_lora.QArray` head: the vocabulary in slices of at most
    `head_rows`, each dequantized, used and dropped (`jax.checkpoint`: recomputed for the
    backward), so no full-precision table is ever live. -> ``(tokens, vocab)``."""
    from ..quant import dequantize_array

    vax = 0 if transposed else 1
    vocab = q.shape[vax]
    k = next(k for k in range(1, vocab + 1) if vocab % k == 0 and vocab // k <= head_rows)
    if k == 1 or q.ndim + q.axis == vax or q.scales_offset is not None:
        # one slice, blocks along the vocabulary, or double-quantized scales (their own layout)
        return jax.lax.dot_general(h, dequantize_array(q).astype(dtype), dims)
    pieces = jax.tree.map(  # each array: vocab -> (k, vocab // k), the k slices leading
        lambda x: jnp.moveaxis(x.reshape(x.shape[:vax] + (k, -1) + x.shape[vax + 1 :]), vax, 0), q
    )
    piece = jax.checkpoint(
        lambda p: jax.lax.dot_general(h, dequantize_array(p).astype(dtype), dims)
    )
    out = jax.lax.map(piece, pieces)  # (k, tokens, vocab // k)
    return jnp.moveaxis(out, 0, 1).reshape(h.shape[0], vocab)


def llama_head(params: dict) -> tuple[Any, bool]:
    """A `jax_lora.lm.llama.Llama`'s head from its params: ``(embedding (vocab, d), True)``
    when tied, ``(lm_head kernel (d, vocab), False)`` otherwise (a quantized one -- a GGUF's own
    blocks -- comes back as its `jax_lora.QArray`: `chunked_cross_entropy` dequantizes it one
    block of tokens at a time)."""
    model = params["model"]
    tied = "lm_head" not in model
    return (model["embed_tokens"]["embedding"] if tied else model["lm_head"]["kernel"]), tied


def llama_token_nll(
    apply_fn,
    variables: dict,
    ids: jax.Array,
    labels: jax.Array,
    *,
    chunk: int | None = default_chunk,
    **kwargs: Any,
) -> jax.Array:
    """``(batch, seq)`` next-token NLL of a Llama (plain, or `jax_lora.wrap`-ped: ``apply_fn``
    is its ``apply``, ``variables`` hold ``"params"`` and maybe ``"lora"``) on ``ids: (batch,
    seq)``. ``chunk=None``: the model's full logits (the plain way, for comparison); else
    `chunked_cross_entropy` on its final hidden states (``Llama(..., hidden=True)``). A LoRA
    tree that adapts the head itself (``embed_tokens`` or ``lm_head``) takes the plain way,
    since the chunks read the head's weight directly. ``kwargs`` go to ``apply_fn`` (rngs)."""
    lora = variables.get("lora", {})
    adapts_head = any(
        k in ("embed_tokens", "lm_head")
        for path, _ in jax.tree_util.tree_flatten_with_path(lora)[0]
        for k in (getattr(p, "key", None) for p in path)
    )
    if chunk is None or adapts_head:
        logits = apply_fn(variables, ids, **kwargs)
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    hidden = apply_fn(variables, ids, hidden=True, **kwargs)
    weight, transposed = llama_head(variables["params"])
    return chunked_cross_entropy(hidden, weight, labels, transposed=transposed, chunk=chunk)
