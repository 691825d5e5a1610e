"""Adversarial checks of DoRA on non-Dense weights and LoRA+ grouping (issue #15): each test
pins a bug found by probing, against PEFT's rule or an independent computation."""

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


def _lrs(tx, tree):
    """One SGD step with gradient 1 everywhere: ``{path: -(the leaf's group lr)}``."""
    grads = jax.tree.map(jnp.ones_like, tree)
    u = tx.update(grads, tx.init(tree), tree)[0]
    return {
        "/".join(str(k.key) for k in path if hasattr(k, "key")): float(np.unique(np.asarray(x))[0])
        for path, x in jax.tree_util.tree_flatten_with_path(u)[0]
    }


class EmbedDense(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4, name="proj")(nn.Embed(10, 8, name="emb")(ids))


def test_linen_loraplus_dora_magnitude_is_group_b():
    """PEFT's create_loraplus_optimizer: a 1-D ``lora_magnitude_vector`` (Linear, Embedding) is
    in group B (``param.ndim == 1``; its Embedding check looks at the ModuleDict holding it, not
    at the Embedding), so ``m`` trains at ``λ·lr`` — as NNX already does."""
    cfg = LoraConfig(rank=2, use_dora=True, targets=["emb", "proj"])
    v = jax_lora.wrap(EmbedDense(), cfg).init(jax.random.key(0), jnp.array([[1, 2]]))
    got = {k: x for k, x in _lrs(_tx(), v).items() if k.startswith("lora/")}
    assert got == pytest.approx(
        {
            "lora/emb/embedding/a": -LR_EMB,
            "lora/emb/embedding/b": -LR_EMB,
            "lora/emb/embedding/m": -LR * RATIO,
            "lora/proj/a": -LR,
            "lora/proj/b": -LR * RATIO,
            "lora/proj/m": -LR * RATIO,
        }
    )


class NnxEmbedDense(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(10, 8, rngs=rngs)
        self.proj = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, ids):
        return self.proj(self.emb(ids))


def test_nnx_optimizer_loraplus_with_dora():
    """``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` hands LoRA+ a plain-array state that
    holds DoRA's magnitudes too; they train in group B (as the Variable state does)."""
    cfg = LoraConfig(rank=2, use_dora=True, targets=["emb", "proj"])
    ids = jnp.array([[1, 2]])
    model = jax_lora.wrap(NnxEmbedDense(nnx.Rngs(0)), cfg, example=(ids,))
    before = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.LoRAParam)
    ones = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.LoRAParam))
    opt.update(model, ones)
    after = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    steps = jax.tree.map(lambda x, y: float(np.unique(np.asarray(y - x))[0]), before, after)
    want = {
        "emb": {"embedding_lora_a": -LR_EMB, "embedding_lora_b": -LR_EMB},
        "proj": {"lora_a": -LR, "lora_b": -LR * RATIO, "lora_m": -LR * RATIO},
    }
    want["emb"]["embedding_lora_m"] = -LR * RATIO
    assert jax.tree.map(lambda s: pytest.approx(s, rel=1e-5), want) == steps


class OwnEmbeddingMatmul(nn.Module):
    """A layer with its own matmul weight named ``embedding`` and a bias (not an ``nn.Embed``,
    whose params are exactly ``{"embedding"}``)."""

    @nn.compact
    def __call__(self, x):
        w = self.param("embedding", nn.initializers.normal(0.5), (8, 4))
        return x @ w + self.param("bias", nn.initializers.zeros, (1, 1, 4))


class EmbedThenOwn(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return OwnEmbeddingMatmul(name="proj")(nn.Embed(10, 8, name="emb")(ids))


def test_linen_loraplus_own_weight_named_embedding_with_siblings():
    """PEFT groups by ``isinstance(module, Embedding)``: a layer's own matmul weight named
    ``embedding`` next to other params is groups A/B; only an ``nn.Embed``-like dict (its
    single param ``embedding``) is the embedding group."""
    cfg = LoraConfig(rank=2, targets=["emb", "proj"])
    v = jax_lora.wrap(EmbedThenOwn(), cfg).init(jax.random.key(0), jnp.array([[1, 2]]))
    got = {k: x for k, x in _lrs(_tx(), v).items() if k.startswith("lora/")}
    assert got == pytest.approx(
        {
            "lora/emb/embedding/a": -LR_EMB,
            "lora/emb/embedding/b": -LR_EMB,
            "lora/proj/embedding/a": -LR,
            "lora/proj/embedding/b": -LR * RATIO,
        }
    )


class ConvEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids, img):
        e = nn.Embed(10, 6, name="emb")(ids)
        c = nn.Conv(5, (3, 3), strides=(2, 1), kernel_dilation=(1, 2), name="conv")(img)
        return e, c


def test_linen_magnitude_grads_match_finite_differences():
    """``∂loss/∂m`` of a strided, dilated Conv and an Embed against central differences of the
    forward (independent of autodiff; the norm does not depend on ``m``): float32, ``eps=1e-2``
    on a smooth loss, agreement to 2e-3 relative."""
    ids = jnp.array([[1, 2, 3, 9]])
    img = jax.random.normal(jax.random.key(3), (1, 7, 7, 4))
    cfg = LoraConfig(rank=2, alpha=4.0, use_dora=True, targets=["emb", "conv"])
    wrapped = jax_lora.wrap(ConvEmbed(), cfg)
    v = wrapped.init(jax.random.key(0), ids, img)
    keys = iter(jax.random.split(jax.random.key(1), 8))
    lora = jax.tree.map(lambda t: t + 0.3 * jax.random.normal(next(keys), t.shape), v["lora"])

    @jax.jit
    def loss(lora):
        e, c = wrapped.apply({"params": v["params"], "lora": lora}, ids, img)
        return jnp.sum(jnp.sin(e)) + jnp.sum(jnp.cos(c))

    grads = jax.grad(loss)(lora)
    eps = 1e-2
    for layer, name in (("emb", "embedding"), ("conv", "kernel")):
        m = lora[layer][name]["m"]
        fd = []
        for i in range(m.shape[0]):
            shifted = [jax.tree.map(lambda t: t, lora) for _ in range(2)]
            shifted[0][layer][name]["m"] = m.at[i].add(eps)
            shifted[1][layer][name]["m"] = m.at[i].add(-eps)
            fd.append((float(loss(shifted[0])) - float(loss(shifted[1]))) / (2 * eps))
        got = np.asarray(grads[layer][name]["m"])
        assert np.abs(np.asarray(fd)).max() > 0.1  # every magnitude matters
        np.testing.assert_allclose(got, fd, rtol=2e-3, atol=2e-3)


class OwnNnxEmbeddingMatmul(nnx.Module):
    """A layer whose matmul weight is named ``embedding`` (a projection, not a lookup)."""

    def __init__(self, rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (8, 4)))

    def __call__(self, x):
        return x @ self.embedding[...]


class NnxEmbedOwn(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(10, 8, rngs=rngs)
        self.proj = OwnNnxEmbeddingMatmul(rngs)

    def __call__(self, ids):
        return self.proj(self.emb(ids))


def test_nnx_optimizer_loraplus_matmul_weight_named_embedding():
    """``nnx.Optimizer`` gives LoRA+ Variables at init but plain arrays at update: the groups
    read off the Variables (``nnx.Embed``'s mark) hold at update too, so a matmul weight named
    ``embedding`` trains in groups A/B, not at ``loraplus_lr_embedding``."""
    cfg = LoraConfig(rank=2, targets=["emb/embedding", "proj/embedding"])
    model = jax_lora.wrap(NnxEmbedOwn(nnx.Rngs(0)), cfg, example=(jnp.array([[1, 2]]),))
    before = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    opt = nnx.Optimizer(model, _tx(), wrt=nnx.LoRAParam)
    opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.LoRAParam)))
    after = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))
    steps = jax.tree.map(lambda x, y: float(np.unique(np.asarray(y - x))[0]), before, after)
    want = {
        "emb": {"embedding_lora_a": -LR_EMB, "embedding_lora_b": -LR_EMB},
        "proj": {"embedding_lora_a": -LR, "embedding_lora_b": -LR * RATIO},
    }
    assert jax.tree.map(lambda s: pytest.approx(s, rel=1e-5), want) == steps
