"""Adapters to and from Hugging Face PEFT's on-disk format (``adapter_model.safetensors`` +
``adapter_config.json``), so they load with ``peft.PeftModel.from_pretrained`` and back.

Layouts: PEFT ``lora_A.weight (r, in)`` is ``a (in..., r)`` transposed, ``lora_B.weight
(out, r)`` is ``b (r, out...)`` transposed; multi-axis ``in...``/``out...`` are flattened
row-major, which is how a torch ``nn.Linear`` sees a Flax ``DenseGeneral`` kernel.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .config import LoraConfig
from .factors import factor_nodes
from .targets import path_str

NameMap = Callable[[str], str] | Mapping[str, str] | None
_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_(?P<ab>[AB])\.weight$")

# adapter_config.json fields we cannot honour, with the value that is fine
_UNSUPPORTED = {
    "use_dora": (False, None),
    "bias": ("none",),
    "fan_in_fan_out": (False, None),
    "rank_pattern": ({}, None),
    "alpha_pattern": ({}, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "use_qalora": (False, None),
    "lora_bias": (False, None),
    "trainable_token_indices": (None, {}),
}


def a_to_peft(a: Any) -> np.ndarray:
    """``a (in..., r)`` -> PEFT ``lora_A.weight (r, in)``."""
    a = np.asarray(a)
    return np.ascontiguousarray(a.reshape(-1, a.shape[-1]).T)


def b_to_peft(b: Any) -> np.ndarray:
    """``b (r, out...)`` -> PEFT ``lora_B.weight (out, r)``."""
    b = np.asarray(b)
    return np.ascontiguousarray(b.reshape(b.shape[0], -1).T)


def a_from_peft(lora_a: Any, in_shape: tuple[int, ...]) -> np.ndarray:
    """PEFT ``lora_A.weight (r, in)`` -> ``a (in..., r)``."""
    w = np.asarray(lora_a)
    if w.ndim != 2 or w.shape[1] != math.prod(in_shape):
        raise ValueError(f"lora_A.weight: expected shape (r, {math.prod(in_shape)}), got {w.shape}")
    return np.ascontiguousarray(w.T.reshape(*in_shape, w.shape[0]))


def b_from_peft(lora_b: Any, out_shape: tuple[int, ...]) -> np.ndarray:
    """PEFT ``lora_B.weight (out, r)`` -> ``b (r, out...)``."""
    w = np.asarray(lora_b)
    if w.ndim != 2 or w.shape[0] != math.prod(out_shape):
        raise ValueError(
            f"lora_B.weight: expected shape ({math.prod(out_shape)}, r), got {w.shape}"
        )
    return np.ascontiguousarray(w.T.reshape(w.shape[1], *out_shape))


def _mapper(names: NameMap, default: Callable[[str], str], what: str) -> Callable[[str], str]:
    if names is None:
        return default
    if callable(names):
        return names
    table = dict(names)

    def lookup(key: str) -> str:
        if key not in table:
            raise KeyError(f"the {what} table has no entry for {key!r}")
        return table[key]

    return lookup


def _safetensors():
    try:
        from safetensors import numpy as st
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "PEFT export/import needs safetensors: pip install 'jax_lora[parity]' or safetensors"
        ) from None
    return st


def export_peft(
    directory: str | os.PathLike,
    lora: Mapping[str, Any],
    config: LoraConfig,
    *,
    torch_name: NameMap = None,
    base_model_name_or_path: str | None = None,
) -> list[str]:
    """Write ``lora`` as a PEFT LoRA adapter directory.

    Args:
      directory: created (or replaced, atomically: an existing adapter stays intact if writing
        fails) with ``adapter_model.safetensors`` and ``adapter_config.json``.
      lora: the ``lora`` tree (``variables["lora"]``).
      config: its `LoraConfig` (rank, alpha, dropout, rslora).
      torch_name: maps a Flax layer path (``"encoder/layer_0/attention/self/query"``) to the
        torch module name (``"encoder.layer.0.attention.self.query"``): a function or a dict.
        Default: ``/`` -> ``.``.
      base_model_name_or_path: recorded in ``adapter_config.json``.

    Returns:
      The torch module names written (``target_modules``).
    """
    st = _safetensors()
    name_of = _mapper(torch_name, lambda p: p.replace("/", "."), "torch_name")
    tensors: dict[str, np.ndarray] = {}
    names = []
    for parts, node in factor_nodes(lora):
        path = path_str(parts)
        a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
        if a.shape[-1] != config.rank or b.shape[0] != config.rank:
            raise ValueError(
                f"factors at '{path}' have rank {a.shape[-1]}/{b.shape[0]} (a {a.shape}, b {b.shape}) "
                f"but `config.rank` is {config.rank}; stacked (scanned) factors must be unstacked first"
            )
        name = name_of(path)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a_to_peft(a)
        tensors[f"base_model.model.{name}.lora_B.weight"] = b_to_peft(b)
        names.append(name)
    if not names:
        raise ValueError("`lora` has no factors ({'a': ..., 'b': ...} nodes) to export")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": sorted(names),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": False,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".peft-export-", dir=parent)
    try:
        st.save_file(
            tensors, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"}
        )
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(adapter_config, f, indent=2)
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=".peft-old-", dir=parent)
            os.replace(directory, os.path.join(old, "x"))
        os.replace(tmp, directory)
        if old:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(names)


def import_peft(
    directory: str | os.PathLike,
    *,
    flax_path: NameMap = None,
    like: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """Read a PEFT LoRA adapter directory into a ``lora`` tree and its `LoraConfig`.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      flax_path: maps a torch module name to the Flax layer path (function or dict; default
        ``.`` -> ``/``).
      like: the model's ``lora`` tree (arrays or shape structs, e.g. from `jax_lora.init_lora`
        or ``jax.eval_shape``). Gives multi-axis layers their shapes and dtypes, and is checked:
        every layer must be present with matching shapes. Without it, factors are 2-D.

    Returns:
      ``(lora, config)`` with ``config.targets`` naming exactly the imported layers.
    """
    st = _safetensors()
    from .checkpoint import check_same_layout  # the same path/shape check as orbax restores

    directory = os.fspath(directory)
    with open(os.path.join(directory, "adapter_config.json")) as f:
        raw = json.load(f)
    if raw.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory}: `peft_type` is {raw.get('peft_type')!r}; only 'LORA' adapters are supported"
        )
    for field, fine in _UNSUPPORTED.items():
        if field in raw and raw[field] not in fine:
            raise ValueError(
                f"{directory}: adapter_config.json has `{field}`={raw[field]!r}, which jax_lora does not "
                f"support (supported: {fine[0]!r})"
            )
    name_to_path = _mapper(flax_path, lambda n: n.replace(".", "/"), "flax_path")
    tensors = st.load_file(os.path.join(directory, "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"{directory}: tensor {key!r} is not a LoRA Linear factor (expected "
                "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight'); embedding, conv, DoRA "
                "and modules_to_save weights are not supported"
            )
        pairs.setdefault(m["name"], {})[m["ab"]] = value
    flat_like = {path_str(p): n for p, n in factor_nodes(like)} if like is not None else {}
    lora: dict[str, Any] = {}
    for name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"{directory}: module {name!r} has lora_{''.join(ab)} but not both lora_A and lora_B"
            )
        path = name_to_path(name)
        ref = flat_like.get(path)
        in_shape = tuple(ref["a"].shape[:-1]) if ref is not None else (ab["A"].shape[1],)
        out_shape = tuple(ref["b"].shape[1:]) if ref is not None else (ab["B"].shape[0],)
        try:
            a, b = a_from_peft(ab["A"], in_shape), b_from_peft(ab["B"], out_shape)
        except ValueError as e:
            raise ValueError(f"{directory}: module {name!r} (Flax '{path}'): {e}") from None
        if ref is not None:
            a, b = a.astype(ref["a"].dtype), b.astype(ref["b"].dtype)
        node = lora
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(a=a, b=b)
    if like is not None:
        check_same_layout(lora, like, f"PEFT adapter {directory}")
    config = LoraConfig(
        rank=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", raw["r"])),
        targets=sorted(re.escape(path_str(p)) for p, _ in factor_nodes(lora)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        rslora=bool(raw.get("use_rslora", False)),
    )
    return lora, config
