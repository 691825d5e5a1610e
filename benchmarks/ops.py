"""Where the frozen JAX model's CPU step goes vs torch: the benchmark model's non-LoRA ops,
forward + backward, JAX next to torch, interleaved (medians of ``--repeats`` rounds).

    python benchmarks/ops.py                  # run.py's default size: batch 4, seq 128, d 768
    python benchmarks/ops.py --json           # last line: one JSON object

Each row times one op's forward and its gradient with respect to its input (the frozen
floor's backward), except ``dense_dW`` (the weight gradient full fine-tuning adds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument(
        "--torch-threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the per-round shuffle")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _causal_einsum_attention(q, k, v):
    """The textbook attention: ``(b, t, h, d)`` in and out, fp32 softmax over masked scores."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.float32(np.sqrt(q.shape[-1]))
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def _ce(logits, labels):
    """Mean softmax cross-entropy (as run.py's loss), a scalar."""
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def jax_ops(a) -> dict:
    """``{name: fn()}`` for the JAX side: each runs forward + backward and blocks."""
    b, t, d, h = a.batch, a.seq, a.d_model, a.heads
    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32))

    qkv = [arr(b, t, h, d // h) for _ in range(3)]
    x, x_ff, w, w_ff = arr(b, t, d), arr(b, t, 4 * d), arr(d, 4 * d), arr(4 * d, d)
    scale, bias = arr(d), arr(d)
    x2, w_head = arr(b * t, d), arr(d, a.vocab)
    logits = arr(b * t, a.vocab)
    labels = jnp.asarray(rng.integers(0, a.vocab, (b * t,)), jnp.int32)

    def vjp_in(f, *args):
        """Forward and the first argument's gradient for a random cotangent (a constant one
        lets XLA simplify the backward away)."""
        ct = arr(*jax.eval_shape(f, *args).shape)
        g = jax.jit(lambda ct, *xs: jax.vjp(lambda x0: f(x0, *xs[1:]), xs[0])[1](ct)[0])
        return lambda: g(ct, *args).block_until_ready()

    def layer_norm(x):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(v + np.float32(1e-5)) * scale + bias

    ops = {
        "attn_xla": vjp_in(
            lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True), *qkv
        ),
        "attn_einsum": vjp_in(_causal_einsum_attention, *qkv),
        "gelu_tanh": vjp_in(lambda x: jax.nn.gelu(x, approximate=True), x_ff),
        "gelu_exact": vjp_in(lambda x: jax.nn.gelu(x, approximate=False), x_ff),
        "layer_norm": vjp_in(layer_norm, x),
        "dense_3d": vjp_in(lambda x: jnp.einsum("btd,df->btf", x, w), x),
        "dense_2d": vjp_in(lambda x: (x.reshape(-1, d) @ w).reshape(b, t, -1), x),
        "dense_dW_3d": vjp_in(lambda w: jnp.einsum("btf,fd->btd", x_ff, w), w_ff),
        "dense_dW_2d": vjp_in(lambda w: (x_ff.reshape(-1, 4 * d) @ w).reshape(b, t, d), w_ff),
        "head": vjp_in(lambda x: x @ w_head, x2),
        "softmax_ce": vjp_in(lambda z: _ce(z, labels), logits),
    }
    return ops


def torch_ops(a) -> dict:
    import torch
    from torch.nn import functional as F

    torch.set_num_threads(a.torch_threads)
    b, t, d, h = a.batch, a.seq, a.d_model, a.heads
    g = torch.Generator().manual_seed(0)

    def arr(*shape, grad=False):
        return torch.randn(*shape, generator=g).requires_grad_(grad)

    qkv = [arr(b, h, t, d // h, grad=True) for _ in range(3)]
    x, x_ff = arr(b, t, d, grad=True), arr(b, t, 4 * d, grad=True)
    w, w_ff = arr(4 * d, d), arr(d, 4 * d, grad=True)
    ln = torch.nn.LayerNorm(d, eps=1e-5)
    x2, w_head = arr(b * t, d, grad=True), arr(a.vocab, d)
    logits = arr(b * t, a.vocab, grad=True)
    labels = torch.randint(0, a.vocab, (b * t,), generator=g)

    def vjp_in(f, *args):
        with torch.no_grad():
            ct = torch.randn(f(*args).shape, generator=g)

        def run():
            for t_ in args:
                t_.grad = None
            f(*args).backward(ct)

        return run

    return {
        "attn_xla": vjp_in(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), *qkv
        ),
        "gelu_tanh": vjp_in(lambda x: F.gelu(x, approximate="tanh"), x_ff),
        "gelu_exact": vjp_in(F.gelu, x_ff),
        "layer_norm": vjp_in(ln, x),
        "dense_3d": vjp_in(lambda x: F.linear(x, w), x),
        "dense_dW_3d": vjp_in(lambda w: F.linear(x_ff.detach(), w), w_ff),
        "head": vjp_in(lambda x: F.linear(x, w_head), x2),
        "softmax_ce": vjp_in(lambda z: F.cross_entropy(z, labels), logits),
    }


def main(a) -> dict:
    steps = {f"jax/{k}": f for k, f in jax_ops(a).items()}
    with contextlib.suppress(ImportError):  # torch is optional: the JAX column alone
        steps |= {f"torch/{k}": f for k, f in torch_ops(a).items()}
    for f in steps.values():
        f()
        f()
    # a fresh seeded order each round: no op always runs right after torch's spinning threads
    rng, names = random.Random(a.seed), list(steps)
    times: dict[str, list[float]] = {n: [] for n in steps}
    for _ in range(a.repeats):
        rng.shuffle(names)
        for n in names:
            t = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    print(
        f"b={a.batch} t={a.seq} d={a.d_model} heads={a.heads} vocab={a.vocab}; torch threads "
        f"{a.torch_threads}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        "forward + input gradient, ms"
    )
    print(f"{'op':<14} {'jax':>8} {'torch':>8} {'jax/torch':>9}")
    for op in (k[4:] for k in med if k.startswith("jax/")):
        j, tt = med[f"jax/{op}"], med.get(f"torch/{op}")
        print(f"{op:<14} {j:8.2f} " + (f"{tt:8.2f} {j / tt:9.2f}" if tt else f"{'':8} {'':9}"))
    if a.json:
        print(json.dumps({"median_ms": med}))
    return med


if __name__ == "__main__":
    main(parse_args())
