"""Adapters to and from Hugging Face PEFT's on-disk format (``adapter_model.safetensors`` +
``adapter_config.json``), so they load with ``peft.PeftModel.from_pretrained`` and back.

Layouts (``kind`` of a factor node):

- ``"linear"``: PEFT ``lora_A.weight (r, in)`` is ``a (in..., r)`` transposed, ``lora_B.weight
  (out, r)`` is ``b (r, out...)`` transposed; multi-axis ``in...``/``out...`` are flattened
  row-major, which is how a torch ``nn.Linear`` sees a Flax ``DenseGeneral`` kernel. GPT-2's
  ``Conv1D`` (kernel stored ``(out, in)`` in Flax, ``(in, out)`` in torch) has the same factor
  layout: its ``a``/``b`` are read off the contraction, so only ``fan_in_fan_out`` differs.
- ``"conv"``: a Flax conv kernel ``(window..., in, out)`` has ``a (window..., in, r)`` and
  ``b (r, out)``; PEFT's ``lora_A`` is a conv ``(r, in, window...)``, ``lora_B`` a 1x1 conv
  ``(out, r, 1...)``.
- ``"embedding"``: ``nn.Embed``'s table ``(vocab, d)`` has ``a (vocab, r)``, ``b (r, d)``; PEFT's
  ``lora_embedding_A (r, vocab)`` and ``lora_embedding_B (d, r)`` are their transposes.

Stacked (scanned) factors ``a (L, in..., r)``, ``b (L, r, out...)`` are L torch modules, one per
layer.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import numbers
import os
import re
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from flax.core import meta

from .config import LoraConfig
from .targets import path_str
from .trees import check_same_layout, factor_nodes

NameMap = Callable[[str], str] | Mapping[str, str] | None
Stacked = Mapping[str, str | None] | None
_KEY = re.compile(
    r"^base_model\.model\.(?P<name>.+)\.lora_(?:(?P<emb>embedding_)(?P<eab>[AB])|(?P<ab>[AB])\.weight)$"
)
KINDS = ("linear", "conv", "embedding")
_MAGNITUDE_KEY = re.compile(r"^base_model\.model\.(?P<name>.+)\.lora_magnitude_vector$")
Kinds = Mapping[str, str] | None
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_ADAPTER_FILES = frozenset({CONFIG, WEIGHTS, "README.md"})  # what export_peft may replace

# adapter_config.json policy. A field is read (r, lora_alpha, ...), known to be harmless to the
# math of a trained Linear adapter (bookkeeping, or init-only options), or refused whenever it
# is set (not None/False/empty; `bias` not "none"): it changes the math and jax_lora does not
# implement it. Unknown fields (newer PEFT) are refused unless set to None/False/empty.
_READ = ("peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "init_lora_weights")
_READ += ("rank_pattern", "alpha_pattern")
_READ += ("use_dora",)  # DoRA: `lora_magnitude_vector (out,)` per module, `m (out...)` here
_HARMLESS = frozenset(
    {
        *("task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"),
        *("inference_mode", "target_modules", "exclude_modules", "layers_pattern"),
        # the factors are the same; only how PEFT reads GPT-2's Conv1D base weight differs
        "fan_in_fan_out",
        *("megatron_config", "megatron_core", "runtime_config", "ensure_weight_tying"),
        # used only by an `init_lora_weights` we check separately
        *("loftq_config", "eva_config", "corda_config", "lora_ga_config", "qalora_group_size"),
    }
)
_OFF: tuple[Any, ...] = (None, False, {}, [], "")
_UNSUPPORTED = {
    "bias": ("none",),
    "modules_to_save": _OFF,
    "layers_to_transform": _OFF,
    "layer_replication": _OFF,
    "use_qalora": _OFF,
    "lora_bias": _OFF,
    "trainable_token_indices": _OFF,
    "target_parameters": _OFF,  # LoRA on nn.Parameter (MoE experts), not on a Linear
    "alora_invocation_tokens": _OFF,  # activated LoRA: the adapter is off before the tokens
    "use_bdlora": _OFF,
    "arrow_config": _OFF,
    "kasa_config": _OFF,
    "monteclora_config": _OFF,
    "velora_config": _OFF,
}
# init-only choices: the trained factors are plain LoRA on the unchanged base model
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig's defaults for absent fields


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


def _kind_of(kinds: Mapping[str, str], path: str, a: np.ndarray) -> str:
    """The layout of the factor node at ``path``: ``kinds`` (regex -> kind, first full match),
    else an ``embedding`` weight is an embedding, a ``kernel`` weight path with ``a.ndim > 2``
    a conv, anything else linear."""
    for pattern, kind in kinds.items():
        if re.fullmatch(pattern, path):
            return kind
    leaf = path.rpartition("/")[2]
    if leaf == "embedding" and a.ndim == 2:
        return "embedding"
    if leaf == "kernel" and a.ndim > 2:
        return "conv"
    return "linear"


def _check_kinds(kinds: Mapping[str, str]) -> None:
    for pattern, kind in kinds.items():
        if kind not in KINDS:
            raise ValueError(f"`kinds` maps {pattern!r} to {kind!r}; expected one of {KINDS}")
        re.compile(pattern)


def to_peft(a: Any, b: Any, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` -> PEFT's ``(lora_A, lora_B)`` tensors for a layer of ``kind``."""
    a, b = np.asarray(a), np.asarray(b)
    if kind == "conv":
        if b.ndim != 2:
            raise ValueError(f"conv factors need b (r, out), got b {b.shape}")
        n = a.ndim
        la = np.transpose(a, (n - 1, n - 2, *range(n - 2)))  # (r, in, window...)
        lb = b.T.reshape(b.shape[1], b.shape[0], *([1] * (n - 2)))  # (out, r, 1...)
        return np.ascontiguousarray(la), np.ascontiguousarray(lb)
    return a_to_peft(a), b_to_peft(b)  # linear and embedding: both transposed


def from_peft(
    la: Any, lb: Any, kind: str, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None
) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``(lora_A, lora_B)`` -> ``(a, b)`` (inverse of `to_peft`)."""
    la, lb = np.asarray(la), np.asarray(lb)
    if kind == "conv":
        if la.ndim < 3 or lb.ndim != la.ndim or any(d != 1 for d in lb.shape[2:]):
            raise ValueError(
                f"conv LoRA needs lora_A (r, in, window...) and lora_B (out, r, 1...), got "
                f"{la.shape} and {lb.shape}"
            )
        n = la.ndim
        a = np.transpose(la, (*range(2, n), 1, 0))
        if in_shape is not None and a.shape[:-1] != tuple(in_shape):
            raise ValueError(f"lora_A: expected (window..., in) {in_shape}, got {a.shape[:-1]}")
        return np.ascontiguousarray(a), np.ascontiguousarray(lb.reshape(lb.shape[:2]).T)
    a = a_from_peft(la, in_shape if in_shape is not None else (la.shape[1],))
    b = b_from_peft(lb, out_shape if out_shape is not None else (lb.shape[0],))
    return a, b


def default_torch_name(path: str) -> str:
    """The torch module name of a Flax factor path: ``/`` -> ``.``, without a trailing weight
    name ``kernel`` or ``embedding`` (``h/0/attn/c_attn/kernel`` -> ``h.0.attn.c_attn``)."""
    head, _, leaf = path.rpartition("/")
    if head and leaf in ("kernel", "embedding"):
        path = head
    return path.replace("/", ".")


def _weight_under(path: str, kind: str, flat_like: Mapping[str, Any]) -> str:
    """The Flax factor path for torch module ``path`` (already ``/``-joined): the module itself
    (a Dense-family layer), or its ``kernel``/``embedding`` weight (any other layer)."""
    candidates = [path, f"{path}/kernel", f"{path}/embedding"]
    hits = [c for c in candidates if c in flat_like]
    if len(hits) == 1:
        return hits[0]
    if hits or flat_like:
        return path
    return {"embedding": f"{path}/embedding", "conv": f"{path}/kernel"}.get(kind, path)


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
            "PEFT export/import needs safetensors (a jax_lora dependency): pip install safetensors"
        ) from None
    return st


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _stack_key(stacked: Mapping[str, str | None], path: str) -> str | None:
    """The longest `stacked` key that is ``path`` or one of its parent layers."""
    keys = [k for k in stacked if _under(path, k)]
    return max(keys, key=len) if keys else None


def _template_problem(template: str) -> tuple[str, str | None] | None:
    """What is wrong with a `stacked` per-layer template, and a fixed one if it is clear."""
    if template.count("{i}") != 1:
        return f"it holds '{{i}}' {template.count('{i}')} times", None
    if "{" in template.replace("{i}", "") or "}" in template.replace("{i}", ""):
        return "it has braces other than '{i}'", None
    if "." in template:  # the torch side's separator; import reads '.' back as '/'
        fixed = template.replace(".", "/")
        return "it has a '.', but Flax paths join their parts with '/'", fixed
    if "" in template.split("/"):
        fixed = "/".join(p for p in template.split("/") if p)
        return "it has an empty part (a leading, trailing or doubled '/')", fixed
    return None


def _check_templates(stacked: Mapping[str, str | None]) -> None:
    for key, template in stacked.items():
        if template is None:
            continue
        if not isinstance(template, str):
            raise TypeError(
                f"`stacked`[{key!r}] is {template!r}; expected a per-layer path like 'layers/{{i}}'"
                " or None"
            )
        problem = _template_problem(template)
        if problem is not None:
            what, fixed = problem
            hint = f"; did you mean {fixed!r}?" if fixed and not _template_problem(fixed) else ""
            raise ValueError(
                f"`stacked`[{key!r}] is {template!r}: {what}. It is the Flax path layer i would "
                f"have unrolled, parts joined by '/', with '{{i}}' once where the layer index "
                f"goes (e.g. 'layers/{{i}}'){hint}"
            )


def _layers(
    path: str, a: np.ndarray, b: np.ndarray, rank: int, stacked: Mapping[str, str | None]
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """``(per-layer Flax path, a, b)``: one for a layer, L for a declared stack of L layers."""
    key = _stack_key(stacked, path)
    maybe_stack = a.ndim >= 3 and b.ndim >= 3 and a.shape[0] == b.shape[0]
    if key is not None and stacked[key] is not None:
        if not maybe_stack:
            raise ValueError(
                f"factors at '{path}' (a {a.shape}, b {b.shape}) are not a stack: `stacked` key "
                f"{key!r} needs a (L, in..., r) and b (L, r, out...) with the same L"
            )
        rest = path[len(key) :]
        for i in range(a.shape[0]):
            yield from _layers(stacked[key].format(i=i) + rest, a[i], b[i], rank, {})
        return
    if a.shape[-1] != rank or b.shape[0] != rank:
        hint = (
            "; stacked (scanned) factors need `stacked={'<scanned module path>': "
            "'<per-layer path with {i}>'}`"
            if maybe_stack
            else ""
        )
        raise ValueError(
            f"factors at '{path}' have rank {a.shape[-1]}/{b.shape[0]} (a {a.shape}, b {b.shape}) "
            f"but `config.rank` is {rank}{hint}"
        )
    if maybe_stack and b.shape[1] == rank and key is None:
        parent = path.rpartition("/")[0] or path
        raise ValueError(
            f"factors at '{path}' (a {a.shape}, b {b.shape}) fit both one layer with multi-axis "
            f"input and output and a stack of {a.shape[0]} layers (scanned or vmapped); jax_lora "
            f"does not guess. Say which: `stacked={{{parent!r}: {parent + '/{i}'!r}}}` (the "
            f"scanned module's path, and the path layer i would have unrolled) exports one module "
            f"per layer; `stacked={{{path!r}: None}}` exports one layer"
        )
    yield path, a, b


def export_peft(
    directory: str | os.PathLike,
    lora: Mapping[str, Any],
    config: LoraConfig,
    *,
    torch_name: NameMap = None,
    base_model_name_or_path: str | None = None,
    stacked: Stacked = None,
    overwrite: bool = False,
    kinds: Kinds = None,
    fan_in_fan_out: bool = False,
) -> list[str]:
    """Write ``lora`` as a PEFT LoRA adapter directory.

    Args:
      directory: created, or replaced atomically (readers see the old adapter or the new one,
        both complete; a failed export leaves the old one), holding ``adapter_model.safetensors``
        and ``adapter_config.json``. A new folder's mode follows the umask (0755 under umask
        022, files 0644); a replaced folder keeps its mode. Only a folder that holds an adapter
        (those two files, maybe ``README.md``) or nothing is replaced: anything else in it is
        refused, unless ``overwrite=True`` (which deletes it).
      lora: the ``lora`` tree (``variables["lora"]``); partitioning boxes are unwrapped.
      config: its `LoraConfig` (rank, alpha, dropout, rslora).
      torch_name: maps a Flax layer path (``"encoder/layer_0/attention/self/query"``) to the
        torch module name (``"encoder.layer.0.attention.self.query"``): a function or a dict.
        Default: ``/`` -> ``.``. Two layers may not share a torch name.
      base_model_name_or_path: recorded in ``adapter_config.json``.
      stacked: layer stacks (``nn.scan``, ``nnx.vmap``): ``{scanned module path: per-layer
        path}``, the latter a Flax path (parts joined by ``/``, not ``.``) holding ``{i}`` once
        for the layer index, checked here, e.g. ``{"blocks": "block_{i}"}``
        exports ``blocks/fc1`` (``a (L, in, r)``, ``b (L, r, out)``) as the L layers
        ``block_0/fc1`` ... (then named by ``torch_name``). ``{path: None}`` declares factors
        unstacked. Factors that fit both readings (``a (n, in, r)``, ``b (n, r, out)``) must
        be declared; nothing is guessed from shapes.
      overwrite: replace ``directory`` even if it holds other files.
      kinds: ``{path regex: "linear" | "conv" | "embedding"}`` for factor nodes whose layout
        (see the module docstring) is not the default: a weight path ending in ``embedding``
        (``nn.Embed``) is an embedding, one ending in ``kernel`` with ``a.ndim > 2`` a conv,
        anything else linear.
      fan_in_fan_out: recorded in ``adapter_config.json``; set it for GPT-2's ``Conv1D``
        layers (PEFT also switches it on by itself for them). The factors do not change.

    Returns:
      The torch module names written (``target_modules``).

    >>> import numpy as np, tempfile
    >>> lora = {"blocks": {"fc": {"a": np.ones((2, 16, 4)), "b": np.ones((2, 4, 8))}}}
    >>> export_peft(tempfile.mkdtemp(), lora, LoraConfig(rank=4), stacked={"blocks": "h/{i}"})
    ['h.0.fc', 'h.1.fc']
    """
    st = _safetensors()
    name_of = _mapper(torch_name, default_torch_name, "torch_name")
    stacked = dict(stacked or {})
    _check_templates(stacked)
    kinds = dict(kinds or {})
    _check_kinds(kinds)
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}  # torch name -> Flax path
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    nodes = [(path_str(parts), node) for parts, node in factor_nodes(meta.unbox(lora))]
    used = {_stack_key(stacked, path) for path, _ in nodes}
    for key in sorted(set(stacked) - used):
        raise ValueError(f"`stacked` key {key!r} names no factors in `lora` (a typo?)")
    for path, node in nodes:
        a, b = np.asarray(node["a"], np.float32), np.asarray(node["b"], np.float32)
        m = _export_magnitude(path, node, config)
        for i, (layer, la, lb) in enumerate(_layers(path, a, b, config.rank_for(path), stacked)):
            name = name_of(layer)
            if name in owner:
                first, second = sorted((owner[name], layer))
                raise ValueError(
                    f"Flax layers '{first}' and '{second}' both map to torch module {name!r}; "
                    "give each layer its own name in `torch_name`"
                )
            owner[name] = layer
            if config.rank_for(path) != config.rank:  # PEFT's keys: regexes on module names
                rank_pattern["^" + re.escape(name)] = config.rank_for(path)
            if config.alpha_for(path) != config.alpha:
                alpha_pattern["^" + re.escape(name)] = config.alpha_for(path)
            kind = _kind_of(kinds, layer, la)
            ta, tb = to_peft(la, lb, kind)
            if kind == "embedding":
                tensors[f"base_model.model.{name}.lora_embedding_A"] = ta
                tensors[f"base_model.model.{name}.lora_embedding_B"] = tb
            else:
                tensors[f"base_model.model.{name}.lora_A.weight"] = ta
                tensors[f"base_model.model.{name}.lora_B.weight"] = tb
            if m is not None:
                mi = m[i] if la.ndim < a.ndim else m  # a stack exports one module per layer
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = mi.reshape(
                    _magnitude_shape(kind, -1, ta.ndim)
                )
    if not owner:
        raise ValueError("`lora` has no factors ({'a': ..., 'b': ...} nodes) to export")
    names = sorted(owner)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.rslora,
        "target_modules": names,
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "init_lora_weights": True,
        "use_dora": config.use_dora,
        "modules_to_save": None,
        "rank_pattern": dict(sorted(rank_pattern.items())),
        "alpha_pattern": dict(sorted(alpha_pattern.items())),
        "inference_mode": True,
    }
    files = {
        WEIGHTS: st.save(tensors, metadata={"format": "pt"}),
        CONFIG: json.dumps(adapter_config, indent=2).encode(),
    }
    _replace_folder(os.fspath(directory), files, overwrite=overwrite)
    return names


def _export_magnitude(path: str, node: Mapping[str, Any], config: LoraConfig) -> Any:
    """DoRA's ``m (lead..., out...)`` of a node as float32, or None; it must agree with
    ``config.use_dora``."""
    if ("m" in node) != config.use_dora:
        has = "has a DoRA magnitude 'm'" if "m" in node else "has no DoRA magnitude 'm'"
        raise ValueError(
            f"the `lora` node at '{path}' {has}, but `config.use_dora` is {config.use_dora}; "
            "export with the config the factors were trained with"
        )
    return np.asarray(node["m"], np.float32) if "m" in node else None


# --- the atomic folder replace ------------------------------------------------------------
# The new adapter is written and fsynced in a fresh hidden folder next to `directory`, then
# swapped in with one renameat2(RENAME_EXCHANGE) (Linux >= 3.15, glibc >= 2.28; ext4, xfs,
# btrfs, tmpfs, ...): at every instant `directory` is the complete old or the complete new
# adapter, even if the process is killed. Where the exchange is unavailable the fallback is two
# renames (old aside, new in) with a short gap in which `directory` is absent (never partial),
# and the old adapter is renamed back if the second rename fails. A killed export may leave a
# hidden `.<name>.peft-*` folder behind, never a damaged adapter.


def _exchange(a: str, b: str) -> None:
    """Atomically swap the paths ``a`` and ``b`` (renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), a, None, b)


def _swap(new: str, old: str) -> None:
    """Put folder ``new`` at ``old``; afterwards ``new`` holds the old contents."""
    try:
        _exchange(new, old)
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
    aside = new + ".old"
    os.rename(old, aside)
    try:
        os.rename(new, old)
    except BaseException:
        os.rename(aside, old)
        raise
    os.rename(aside, new)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_folder(directory: str, files: Mapping[str, bytes], *, overwrite: bool) -> None:
    directory = os.path.realpath(directory)  # replace the folder a symlink points to
    old_mode = None
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"{directory} exists and is not a folder; export_peft writes a folder")
        extra = sorted(set(os.listdir(directory)) - _ADAPTER_FILES)
        if extra and not overwrite:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise ValueError(
                f"{directory} holds files that are not a PEFT adapter ({shown}); export_peft "
                "replaces the whole folder, so it refuses. Export to an empty or new folder, or "
                "pass overwrite=True to delete them."
            )
        old_mode = stat.S_IMODE(os.stat(directory).st_mode)
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    while True:
        tmp = os.path.join(parent, f".{base}.peft-{secrets.token_hex(4)}")
        try:
            os.mkdir(tmp, 0o777)  # the umask applies, unlike mkdtemp's 0700
            break
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    try:
        if old_mode is not None:
            os.chmod(tmp, old_mode)
        for name, data in files.items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        _fsync(tmp)
        if old_mode is None:
            os.rename(tmp, directory)
            tmp = None
        else:
            _swap(tmp, directory)  # tmp now holds the old adapter
        _fsync(parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# --- import ---------------------------------------------------------------------------------


def _read_config(directory: str) -> tuple[dict[str, Any], int, float]:
    """``(raw adapter_config.json, r, lora_alpha)``, with every field checked against policy."""
    where = os.path.join(directory, CONFIG)

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    try:
        with open(where, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist; is {directory} a PEFT adapter?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"not valid JSON ({e}); the file is truncated or corrupt") from None
    if not isinstance(raw, dict):
        raise bad(f"holds a JSON {type(raw).__name__}, expected a JSON object of fields")
    if raw.get("peft_type") != "LORA":
        raise bad(f"`peft_type` is {raw.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field, value in raw.items():
        if field in _READ or field in _HARMLESS:
            continue
        fine = _UNSUPPORTED.get(field)
        if fine is None and value not in _OFF:
            raise bad(
                f"unknown field `{field}`={value!r} (from a newer PEFT?); jax_lora cannot tell "
                "whether it changes the adapter's math, so it refuses. Remove the field if you "
                "know it is harmless."
            )
        if fine is not None and value not in fine:
            raise bad(
                f"`{field}`={value!r}, which jax_lora does not support (supported: {fine[0]!r})"
            )
    init = raw.get("init_lora_weights", True)
    if (init.lower() if isinstance(init, str) else init) not in _PLAIN_INITS:
        raise bad(
            f"`init_lora_weights`={init!r}: PiSSA, OLoRA, CorDA, LoftQ and LoRA-GA adapters apply "
            "to a residual (modified) base model, not the original one, and other values are "
            f"unknown; jax_lora imports only plain LoRA ({', '.join(map(repr, _PLAIN_INITS))}). "
            "Convert a PiSSA/OLoRA adapter to plain LoRA first (PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...), or jax_lora.convert_to_lora)"
        )
    r = raw.get("r", PEFT_DEFAULT_R)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise bad(f"`r`={r!r}; expected an integer >= 1")
    alpha = raw.get("lora_alpha", PEFT_DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise bad(f"`lora_alpha`={alpha!r}; expected a number")
    dropout = raw.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise bad(f"`lora_dropout`={dropout!r}; expected a number in [0, 1)")
    if not isinstance(raw.get("use_rslora", False), bool):
        raise bad(f"`use_rslora`={raw['use_rslora']!r}; expected true or false")
    for field, want in (("rank_pattern", "integers >= 1"), ("alpha_pattern", "numbers > 0")):
        value = raw.get(field) or {}
        ok = isinstance(value, dict) and all(
            isinstance(v, numbers.Real)
            and not isinstance(v, bool)
            and (isinstance(v, int) if field == "rank_pattern" else math.isfinite(v))
            and v > (0 if field == "alpha_pattern" else 0.5)
            for v in value.values()
        )
        if not ok:
            raise bad(f"`{field}`={value!r}; expected an object {{regex: {want}}}")
        try:
            for key in value:
                re.compile(key)
        except re.error as e:
            raise bad(f"`{field}` key {key!r} is not a valid regex: {e}") from None
    if raw.get("use_dora") is not None and not isinstance(raw["use_dora"], bool):
        raise bad(f"`use_dora`={raw['use_dora']!r}; expected true or false")
    return raw, r, float(alpha)


def peft_pattern_value(patterns: Mapping[str, Any], name: str, default: Any) -> Any:
    """``patterns[key]`` for the first key matching torch module ``name`` as PEFT's
    ``get_pattern_key`` matches it (a regex on the whole name or a ``.``-separated suffix)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_factors(
    directory: str, r: int, r_text: str, rank_pattern: Mapping[str, int]
) -> dict[str, dict[str, np.ndarray]]:
    """``{torch module name: {"A": lora_A.weight, "B": lora_B.weight}}``, ranks checked
    (``r``, or the module's ``rank_pattern`` entry)."""
    where = os.path.join(directory, WEIGHTS)
    try:
        tensors = _safetensors().load_file(where)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where} does not exist; is {directory} a PEFT adapter?") from None
    except Exception as e:  # safetensors raises its own SafetensorError on a damaged file
        raise ValueError(
            f"{where}: cannot read it ({e}); the file is corrupt or truncated"
        ) from None
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        if _MAGNITUDE_KEY.match(key):
            pairs.setdefault(_MAGNITUDE_KEY.match(key)["name"], {})["M"] = value
            continue
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"{where}: tensor {key!r} is not a LoRA Linear factor (expected "
                "'base_model.model.<module>.lora_A.weight' / '.lora_B.weight' / "
                "'.lora_embedding_A' / '.lora_embedding_B' / DoRA's '.lora_magnitude_vector'); "
                "modules_to_save weights are not supported"
            )
        node = pairs.setdefault(m["name"], {})
        kind = "embedding" if m["emb"] else ("conv" if value.ndim > 2 else "linear")
        if node.get("kind", kind) != kind:
            raise ValueError(
                f"{where}: module {m['name']!r} mixes {node['kind']} and {kind} LoRA tensors"
            )
        node["kind"] = kind
        node[m["eab"] or m["ab"]] = value
    for name, ab in sorted(pairs.items()):
        magnitude = ab.pop("M", None)
        kind = ab.pop("kind", None)
        if kind is None:
            raise ValueError(
                f"{where}: 'base_model.model.{name}.lora_magnitude_vector' (DoRA) has no "
                "lora_A / lora_B of its module"
            )
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"{where}: module {name!r} has lora_{''.join(ab)} but not both lora_A and lora_B"
            )
        a, b = ab["A"], ab["B"]
        ab["kind"] = kind
        ndim = a.ndim if kind == "conv" else 2
        rank = peft_pattern_value(rank_pattern, name, r)
        text = r_text if rank == r else f"`rank_pattern` (rank {rank} for {name!r})"
        if a.ndim != ndim or b.ndim != ndim or a.shape[0] != rank or b.shape[1] != rank:
            raise ValueError(
                f"{os.path.join(directory, CONFIG)}: {text} does not fit {where}: module {name!r} "
                f"has lora_A.weight {a.shape} and lora_B.weight {b.shape}; PEFT needs (r, in) and "
                "(out, r), and refuses this adapter too"
            )
        if magnitude is not None:
            _check_magnitude(where, name, kind, magnitude, b.shape[0], b.ndim)
            ab["M"] = magnitude
    return pairs


def _magnitude_shape(kind: str, out: int, ndim: int) -> tuple[int, ...]:
    """PEFT's ``lora_magnitude_vector`` shape: ``(out,)`` for Linear and Embedding (per
    embedding dim), ``(1, out, 1...)`` for a Conv (its norm is kept with ``keepdim``)."""
    return (1, out, *([1] * (ndim - 2))) if kind == "conv" else (out,)


def _check_magnitude(where: str, name: str, kind: str, m: np.ndarray, out: int, ndim: int) -> None:
    key = f"base_model.model.{name}.lora_magnitude_vector"
    want = _magnitude_shape(kind, out, ndim)
    if m.shape != want or not np.issubdtype(m.dtype, np.floating):
        raise ValueError(
            f"{where}: {key!r} has shape {m.shape} and dtype {m.dtype}; DoRA on a {kind} layer "
            f"needs one float per output feature, {want} (PEFT's layout)"
        )


def _flax_paths(
    names: list[str],
    name_to_path: Callable[[str], str],
    stacked: Mapping[str, str | None],
    source: str = "the adapter",
) -> dict[str, tuple[str, int | None]]:
    """``{torch name: (Flax path, layer index in a stack or None)}``; refuses collisions."""
    patterns = [
        (key, re.compile(re.escape(t).replace(re.escape("{i}"), r"(\d+)") + r"(/.*)?"))
        for key, t in stacked.items()
        if t is not None
    ]
    where: dict[str, tuple[str, int | None]] = {}
    matched: set[str] = set()
    for name in names:
        path, index = name_to_path(name), None
        if not path or "" in path.split("/"):
            raise ValueError(
                f"torch module {name!r} maps to Flax path {path!r}, which has an empty part"
            )
        for key, pattern in patterns:
            m = pattern.fullmatch(path)
            if m:
                path, index = key + (m[2] or ""), int(m[1])
                matched.add(key)
                break
        where[name] = (path, index)
    for key, template in stacked.items():
        if template is not None and key not in matched:
            seen = ", ".join(repr(name_to_path(n)) for n in names[:3])
            raise ValueError(
                f"`stacked`[{key!r}] is {template!r}, which matches no module of {source} "
                f"(their Flax paths: {seen}{', ...' if len(names) > 3 else ''}); give the "
                "per-layer path the adapter was exported with, or drop the key"
            )
    seen: dict[tuple[str, int | None], str] = {}
    for name, spot in where.items():
        if spot in seen:
            raise ValueError(
                f"torch modules {seen[spot]!r} and {name!r} both map to Flax path {spot[0]!r}"
                + (f" layer {spot[1]}" if spot[1] is not None else "")
                + "; give each its own path in `flax_path`"
            )
        seen[spot] = name
    by_path = {p: n for n, (p, _) in sorted(where.items())}
    for path, name in sorted(by_path.items()):
        parts = path.split("/")
        for k in range(1, len(parts)):
            prefix = "/".join(parts[:k])
            if prefix in by_path:
                raise ValueError(
                    f"torch module {by_path[prefix]!r} (Flax {prefix!r}) and {name!r} (Flax "
                    f"{path!r}): one layer's path is inside the other's, which a tree cannot "
                    "hold; fix `flax_path`"
                )
    return where


def import_peft(
    directory: str | os.PathLike,
    *,
    flax_path: NameMap = None,
    like: Mapping[str, Any] | None = None,
    stacked: Stacked = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """Read a PEFT LoRA adapter directory into a ``lora`` tree and its `LoraConfig`.

    ``adapter_config.json`` fields that would change the math (DoRA, PiSSA/OLoRA/CorDA/LoftQ
    residual bases, ``target_parameters``, aLoRA, ...) are refused by name, as are unknown
    fields unless None/false/empty; absent ``r`` and ``lora_alpha`` take PEFT's default 8.

    Args:
      directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
      flax_path: maps a torch module name to the Flax layer path (function or dict; default
        ``.`` -> ``/``). Two modules may not share a path, nor may one path hold another.
      like: the model's ``lora`` tree (arrays or shape structs, e.g. from `jax_lora.init_lora`
        or ``jax.eval_shape``; boxes are unwrapped). Gives multi-axis layers their shapes and
        dtypes, and is checked: every layer must be present with matching shapes. Without it,
        factors are 2-D.
      stacked: as in `export_peft`: ``{"blocks": "block_{i}"}`` stacks the modules whose Flax
        path is ``block_<i>/...`` into ``blocks/...`` factors ``a (L, in..., r)``; a template
        that matches no module is refused.

    Returns:
      ``(lora, config)`` with ``config.targets`` naming exactly the imported layers.
    """

    directory = os.fspath(directory)
    raw, r, alpha = _read_config(directory)
    r_text = f"`r`={r}" if "r" in raw else f"`r` (absent: PEFT's default {PEFT_DEFAULT_R})"
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    pairs = _read_factors(directory, r, r_text, rank_pattern)
    stacked = dict(stacked or {})
    _check_templates(stacked)
    name_to_path = _mapper(flax_path, lambda n: n.replace(".", "/"), "flax_path")
    where = _flax_paths(sorted(pairs), name_to_path, stacked, f"the adapter in {directory}")
    like = meta.unbox(like) if like is not None else None
    flat_like = {path_str(p): n for p, n in factor_nodes(like)} if like is not None else {}
    layers: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}
    alphas: dict[str, dict[float, str]] = {}  # Flax path -> {alpha: a torch module with it}
    for name, (path, index) in sorted(where.items()):
        ab = pairs[name]
        if flax_path is None:  # the default names the module: find the weight under it
            path = _weight_under(path, ab["kind"], flat_like)
        ref = flat_like.get(path)
        lead = 0 if index is None else 1  # a stacked reference carries the layer axis first
        in_shape = tuple(ref["a"].shape[lead:-1]) if ref is not None else None
        out_shape = tuple(ref["b"].shape[lead + 1 :]) if ref is not None else None
        try:
            a, b = from_peft(ab["A"], ab["B"], ab["kind"], in_shape, out_shape)
        except ValueError as e:
            raise ValueError(
                f"{os.path.join(directory, WEIGHTS)}: module {name!r} (Flax '{path}'): {e}"
            ) from None
        if ref is not None:
            a, b = a.astype(ref["a"].dtype), b.astype(ref["b"].dtype)
        layer = (a, b)
        if ("M" in ab) != bool(raw.get("use_dora")):
            raise ValueError(
                f"{os.path.join(directory, WEIGHTS)}: module {name!r} "
                + ("has" if "M" in ab else "has no")
                + f" lora_magnitude_vector, but `use_dora` is {raw.get('use_dora')!r}"
            )
        if "M" in ab:
            m = ab["M"].reshape(b.shape[1:])
            layer += (m.astype(ref["m"].dtype) if ref is not None and "m" in ref else m,)
        layers.setdefault(path, {})[index] = layer
        alphas.setdefault(path, {})[float(peft_pattern_value(alpha_pattern, name, alpha))] = name
    for path, seen in alphas.items():
        if len(seen) > 1:
            names = " and ".join(f"{n!r} (alpha {v:g})" for v, n in sorted(seen.items())[:2])
            raise ValueError(
                f"{directory}: the torch modules {names} are layers of one Flax stack '{path}', "
                "which has one alpha; import without `stacked` for this stack"
            )
    lora: dict[str, Any] = {}
    for path, by_index in layers.items():
        if None in by_index:
            arrays = by_index[None]
        else:
            missing = sorted(set(range(max(by_index) + 1)) - set(by_index))
            if missing:
                raise ValueError(
                    f"{directory}: the stack at Flax '{path}' has no layer {missing[0]} "
                    f"(found layers {sorted(by_index)})"
                )
            ranks = {by_index[i][0].shape[-1] for i in by_index}
            if len(ranks) > 1:
                raise ValueError(
                    f"{directory}: the layers of the stack at Flax '{path}' have ranks "
                    f"{sorted(ranks)} (`rank_pattern`), but a stack has one rank; import without "
                    "`stacked` for this stack"
                )
            arrays = [
                np.stack(x) for x in zip(*(by_index[i] for i in sorted(by_index)), strict=True)
            ]
        node = lora
        for part in path.split("/"):
            node = node.setdefault(part, {})
        node.update(zip("abm", arrays, strict=False))
    if like is not None:
        check_same_layout(lora, like, f"PEFT adapter {directory}")
    nodes = sorted((path_str(p), n) for p, n in factor_nodes(lora))
    config = LoraConfig(
        rank=r,
        alpha=alpha,
        targets=[re.escape(p) for p, _ in nodes],
        dropout=float(raw.get("lora_dropout", 0.0)),
        rslora=bool(raw.get("use_rslora", False)),
        rank_pattern={
            "^" + re.escape(p): n["a"].shape[-1] for p, n in nodes if n["a"].shape[-1] != r
        },
        alpha_pattern={
            "^" + re.escape(p): next(iter(alphas[p]))
            for p, _ in nodes
            if next(iter(alphas[p])) != alpha
        },
        use_dora=bool(raw.get("use_dora", False)),
    )
    return lora, config
