"""A trained Llama adapter in the formats people serve with: a GGUF LoRA adapter in llama.cpp's
layout (``convert_lora_to_gguf.py``: ``general.type = "adapter"``, ``adapter.type = "lora"``,
``adapter.lora.alpha``, tensors ``blk.N.attn_q.weight.lora_a (r, in)`` / ``.lora_b (out, r)``
in torch layout, ``lora_b`` of q/k rows permuted as llama.cpp permutes the base q/k weights)."""

from __future__ import annotations

import os
import re
import tempfile

import numpy as np

from ..config import LoraConfig
from ..trees import factor_nodes
from . import llama


def gguf_tensor_name(module: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q.weight``."""
    short = {v: k for k, v in llama._GGUF_NAMES.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if m and m.group(2) in short:
        return f"blk.{m.group(1)}.{short[m.group(2)]}.weight"
    if module in short:
        return f"{short[module]}.weight"
    raise ValueError(f"layer {module!r} has no llama.cpp tensor name")


def write_gguf_adapter(
    path: str, lora: dict, config: LoraConfig, cfg: llama.LlamaConfig, *, name: str = "adapter"
) -> list[str]:
    """Write ``lora`` (the factor tree of a `llama.Llama`) as a GGUF LoRA adapter (fp32) that
    ``llama-cli --lora path`` applies with scale ``alpha / rank``. Written beside ``path`` and
    renamed into place. Returns the tensor names (``blk.N.attn_q.weight.lora_a``, ...)."""
    import gguf

    w_path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".jax-lora-", suffix=".gguf", dir=os.path.dirname(w_path))
    os.close(fd)
    names = []
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        # llama.cpp scales by alpha / rank: carry our scale (rsLoRA included) in alpha
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(config.scale * config.rank))
        w.add_name(name)
        for parts, node in factor_nodes(lora):
            module = llama.torch_name("/".join(parts))
            base = gguf_tensor_name(module)
            a = np.asarray(node["a"], np.float32).T  # (r, in)
            b = np.asarray(node["b"], np.float32).T  # (out, r)
            if base.endswith("attn_q.weight"):
                b = llama.gguf_permute(b, cfg.num_attention_heads)
            elif base.endswith("attn_k.weight"):
                b = llama.gguf_permute(b, cfg.num_key_value_heads)
            for suffix, t in (("lora_a", a), ("lora_b", b)):
                w.add_tensor(f"{base}.{suffix}", np.ascontiguousarray(t))
                names.append(f"{base}.{suffix}")
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, w_path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return names
