"""LoRA+ groups (`jax_lora.optimizer(..., loraplus_lr_ratio=)`) follow the layer kind, as PEFT's
``create_loraplus_optimizer`` (``isinstance(module, Embedding)``), not the factor path's names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_lora
from jax_lora import LoraConfig

LR, RATIO, LR_EMB = 0.1, 16.0, 1e-3


def _tx():
    return jax_lora.optimizer(
        optax.sgd, learning_rate=LR, loraplus_lr_ratio=RATIO, loraplus_lr_embedding=LR_EMB
    )


def _step(tx, tree):
    """One SGD step with gradient 1 everywhere: each leaf's update is -(its group's lr)."""
    grads = jax.tree.map(jnp.ones_like, tree)
    u = tx.update(grads, tx.init(tree), tree)[0]
    return {
        "/".join(str(getattr(k, "key", "")) for k in path if hasattr(k, "key")): float(
            np.unique(np.asarray(x)).item()
        )
        for path, x in jax.tree_util.tree_flatten_with_path(u)[0]
    }


class DenseNamedEmbedding(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(10, 8, name="emb")(ids)
        return nn.Dense(4, name="embedding")(h)  # a Dense layer that happens to be named so


def test_linen_dense_named_embedding_is_not_an_embedding():
    cfg = LoraConfig(rank=2, targets=["emb/embedding", "embedding"])
    v = jax_lora.wrap(DenseNamedEmbedding(), cfg).init(jax.random.key(0), jnp.array([[1, 2]]))
    got = _step(_tx(), v)
    want = {
        "lora/emb/embedding/a": -LR_EMB,  # nn.Embed: PEFT's embedding group
        "lora/emb/embedding/b": -LR_EMB,
        "lora/embedding/a": -LR,  # the Dense layer: groups A and B
        "lora/embedding/b": -LR * RATIO,
    }
    assert {k: v for k, v in got.items() if k.startswith("lora/")} == pytest.approx(want), got


def test_linen_root_embed_is_an_embedding():
    cfg = LoraConfig(rank=2, targets=["embedding"])
    v = jax_lora.wrap(nn.Embed(10, 8), cfg).init(jax.random.key(0), jnp.array([[1, 2]]))
    got = _step(_tx(), v)
    assert got == pytest.approx(
        {"lora/embedding/a": -LR_EMB, "lora/embedding/b": -LR_EMB, "params/embedding": 0.0}
    )


class OwnMatmul(nnx.Module):
    """A layer whose matmul weight is named ``embedding`` (a projection, not a lookup)."""

    def __init__(self, rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (8, 4)))

    def __call__(self, x):
        return x @ self.embedding[...]


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(10, 8, rngs=rngs)
        self.proj = OwnMatmul(rngs)

    def __call__(self, ids):
        return self.proj(self.emb(ids))


def test_nnx_matmul_weight_named_embedding_is_not_an_embedding():
    cfg = LoraConfig(rank=2, targets=["emb/embedding", "proj/embedding"])
    model = jax_lora.wrap(NnxNet(nnx.Rngs(0)), cfg, example=(jnp.array([[1, 2]]),))
    got = _step(_tx(), nnx.state(model, nnx.Param))
    want = {
        "emb/embedding_lora_a": -LR_EMB,  # nnx.Embed: PEFT's embedding group
        "emb/embedding_lora_b": -LR_EMB,
        "proj/embedding_lora_a": -LR,  # a matmul weight: groups A and B
        "proj/embedding_lora_b": -LR * RATIO,
    }
    assert {k: got[k] for k in want} == pytest.approx(want), got
