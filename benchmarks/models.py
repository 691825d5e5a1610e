"""The benchmark model — a GPT-2-shaped decoder (pre-LayerNorm, causal attention, tanh-GELU
MLP, untied head) — written three times with the same layer names and math: Flax linen
(for jax_lora), Flax NNX (for Flax's own ``nnx.LoRALinear``) and PyTorch (for PEFT).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

TARGETS = ("q", "k", "v", "o", "fc1", "fc2")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab: int = 8192
    d_model: int = 768
    heads: int = 12
    d_ff: int = 3072
    layers: int = 2
    seq: int = 128
    dtype: str = "float32"  # parameter/compute dtype of the base model
    # "einsum" (`causal_attention`: 0.79-0.85x of "xla"'s forward + backward time on XLA:CPU at
    # seq 128, benchmarks/ops.py; vs_peft 0.98 vs 1.04 with it) or "xla"
    # (`jax.nn.dot_product_attention`); torch's side is SDPA, the same math
    attention: str = "einsum"

    def matmul_params(self) -> int:
        """Weights that take part in matmuls per token (embedding lookup excluded)."""
        d = self.d_model
        return self.layers * (4 * d * d + 2 * d * self.d_ff) + d * self.vocab

    def forward_flops(self, tokens: int) -> float:
        """Matmul FLOPs of one forward pass: 2 per multiply-add, attention scores and values
        counted in full (no causal halving), LoRA branches excluded."""
        attn = self.layers * 2 * 2 * tokens * self.seq * self.d_model
        return 2.0 * tokens * self.matmul_params() + attn


def add_size_args(parser, *, batch: int) -> None:
    """The model-size flags both benchmarks take (defaults: `GPTConfig`'s)."""
    d = GPTConfig()
    parser.add_argument("--vocab", type=int, default=d.vocab)
    parser.add_argument("--d-model", type=int, default=d.d_model)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--d-ff", type=int, default=d.d_ff)
    parser.add_argument("--layers", type=int, default=d.layers)
    parser.add_argument("--seq", type=int, default=d.seq)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--rank", type=int, default=8)


def causal_attention(q, k, v, impl: str = "xla"):
    """``q, k, v: (batch, seq, heads, head_dim)`` -> the same shape; softmax in fp32."""
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    s = s * jnp.float32(1.0 / q.shape[-1] ** 0.5)
    t = q.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1).astype(v.dtype), v)


# --- linen ---------------------------------------------------------------------------


class Conv1D(nn.Module):
    """GPT-2's ``Conv1D`` as transformers' Flax GPT-2 writes it: the kernel is stored
    ``(out, in)`` and transposed before ``lax.dot_general`` (not a flax ``Dense``)."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.param(
            "kernel", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.dtype
        )
        b = self.param("bias", nn.initializers.zeros, (self.features,), self.dtype)
        y = jax.lax.dot_general(x, k.T, (((x.ndim - 1,), (0,)), ((), ())))
        return y + b.reshape((1,) * (y.ndim - 1) + (-1,))


class LinenBlock(nn.Module):
    cfg: GPTConfig
    conv1d: bool = False  # GPT-2-style Conv1D layers instead of nn.Dense

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        if self.conv1d:
            dense = lambda n, name: Conv1D(n, dtype=dt, name=name)  # noqa: E731
        else:
            dense = lambda n, name: nn.Dense(n, dtype=dt, param_dtype=dt, name=name)  # noqa: E731
        b, t, d = x.shape
        h = nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="ln1")(x)
        q, k, v = (dense(d, n)(h).reshape(b, t, c.heads, d // c.heads) for n in ("q", "k", "v"))
        att = causal_attention(q, k, v, c.attention).reshape(b, t, d)
        x = x + dense(d, "o")(att)
        h = nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="ln2")(x)
        return x + dense(d, "fc2")(nn.gelu(dense(c.d_ff, "fc1")(h), approximate=True))


class LinenGPT(nn.Module):
    """``tokens: (batch, seq)`` int -> logits ``(batch, seq, vocab)``. ``input_scale`` (a
    scalar) multiplies the embeddings: the one trainable number of the `floor` benchmark."""

    cfg: GPTConfig
    conv1d: bool = False

    @nn.compact
    def __call__(self, tokens, input_scale=None):
        c = self.cfg
        dt = jnp.dtype(c.dtype)
        x = nn.Embed(c.vocab, c.d_model, dtype=dt, param_dtype=dt, name="wte")(tokens)
        x = x + nn.Embed(c.seq, c.d_model, dtype=dt, param_dtype=dt, name="wpe")(
            jnp.arange(tokens.shape[1])
        )
        if input_scale is not None:
            x = x * input_scale.astype(dt)
        for i in range(c.layers):
            x = LinenBlock(c, self.conv1d, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=dt, param_dtype=dt, name="ln_f")(x)
        return nn.Dense(c.vocab, use_bias=False, dtype=dt, param_dtype=dt, name="head")(x)


# --- NNX with Flax's own LoRALinear ----------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, c: GPTConfig, rank: int, rngs: nnx.Rngs):
        dt = jnp.dtype(c.dtype)

        def lin(i, o):
            return nnx.LoRALinear(i, o, lora_rank=rank, dtype=dt, param_dtype=dt, rngs=rngs)

        d = c.d_model
        self.c = c
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, dtype=dt, param_dtype=dt, rngs=rngs)
        self.q, self.k, self.v, self.o = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, dtype=dt, param_dtype=dt, rngs=rngs)
        self.fc1, self.fc2 = lin(d, c.d_ff), lin(c.d_ff, d)

    def __call__(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = (
            m(h).reshape(b, t, self.c.heads, d // self.c.heads) for m in (self.q, self.k, self.v)
        )
        x = x + self.o(causal_attention(q, k, v, self.c.attention).reshape(b, t, d))
        return x + self.fc2(nnx.gelu(self.fc1(self.ln2(x)), approximate=True))


class NnxGPT(nnx.Module):
    def __init__(self, c: GPTConfig, rank: int, rngs: nnx.Rngs):
        dt = jnp.dtype(c.dtype)
        self.wte = nnx.Embed(c.vocab, c.d_model, dtype=dt, param_dtype=dt, rngs=rngs)
        self.wpe = nnx.Embed(c.seq, c.d_model, dtype=dt, param_dtype=dt, rngs=rngs)
        self.h = nnx.List([NnxBlock(c, rank, rngs) for _ in range(c.layers)])
        self.ln_f = nnx.LayerNorm(c.d_model, epsilon=1e-5, dtype=dt, param_dtype=dt, rngs=rngs)
        self.head = nnx.Linear(
            c.d_model, c.vocab, use_bias=False, dtype=dt, param_dtype=dt, rngs=rngs
        )

    def __call__(self, tokens):
        x = self.wte(tokens) + self.wpe(jnp.arange(tokens.shape[1]))
        for block in self.h:
            x = block(x)
        return self.head(self.ln_f(x))


# --- PyTorch -----------------------------------------------------------------------------


def torch_gpt(c: GPTConfig):
    import torch
    from torch import nn as tnn
    from torch.nn import functional as F

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            d = c.d_model
            self.ln1, self.ln2 = tnn.LayerNorm(d, eps=1e-5), tnn.LayerNorm(d, eps=1e-5)
            self.q, self.k, self.v, self.o = (tnn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = tnn.Linear(d, c.d_ff), tnn.Linear(c.d_ff, d)

        def forward(self, x):
            b, t, d = x.shape
            h = self.ln1(x)
            q, k, v = (
                m(h).view(b, t, c.heads, d // c.heads).transpose(1, 2)
                for m in (self.q, self.k, self.v)
            )
            att = (
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
                .transpose(1, 2)
                .reshape(b, t, d)
            )
            x = x + self.o(att)
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x)), approximate="tanh"))

    class GPT(tnn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = tnn.Embedding(c.vocab, c.d_model), tnn.Embedding(c.seq, c.d_model)
            self.h = tnn.ModuleList([Block() for _ in range(c.layers)])
            self.ln_f = tnn.LayerNorm(c.d_model, eps=1e-5)
            self.head = tnn.Linear(c.d_model, c.vocab, bias=False)

        def forward(self, tokens):
            x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
            for block in self.h:
                x = block(x)
            return self.head(self.ln_f(x))

    return GPT()
