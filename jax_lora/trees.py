"""The ``lora`` tree: its collection, its factor nodes, key paths as strings, and the
path-by-path layout check shared by checkpoints, PEFT import and NNX `load_lora`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

COLLECTION = "lora"
"""The variable collection that holds the factors: ``variables["lora"][...path...]["a"|"b"]``."""


def key_name(k: Any) -> str:
    """A pytree key (dict key, attribute, index) as the string used in ``/``-joined paths."""
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def keypath_str(keypath: Iterable[Any]) -> str:
    return "/".join(key_name(k) for k in keypath)


def flat_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of an unboxed tree, paths joined with ``/``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(keypath_str(kp), v) for kp, v in flat]


def check_layout(
    have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], what: str
) -> None:
    for path in sorted(set(have) | set(want)):
        if path not in have:
            raise ValueError(
                f"the {what} has no factor '{path}' that the model needs (shape {want[path]}); "
                "targets differ?"
            )
        if path not in want:
            raise ValueError(
                f"the {what} has factor '{path}' {have[path]} that the model does not; targets differ?"
            )
        if have[path] != want[path]:
            raise ValueError(
                f"the {what} has '{path}' with shape {have[path]}, the model needs {want[path]}"
            )


def check_same_layout(stored: Any, like: Any, what: str = "checkpoint") -> None:
    """Raise a ValueError naming the first path where ``stored`` and ``like`` differ in
    presence or shape. Boxed leaves (``nn.Partitioned``, ...) count as their values."""
    have = {p: tuple(np.shape(v)) for p, v in flat_paths(meta.unbox(stored))}
    want = {p: tuple(np.shape(v)) for p, v in flat_paths(meta.unbox(like))}
    check_layout(have, want, what)


def factor_nodes(
    tree: Mapping[str, Any], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], Mapping[str, Any]]]:
    """Walk a ``lora`` tree: yield ``(layer path, {"a": ..., "b": ...})`` for each adapted layer.

    Strict: a node holding arrays must be exactly ``{"a", "b"}`` with floating-point arrays
    (a wrong-cased ``A``/``B``, an extra leaf, or integer/complex factors raise, naming the
    path), so a malformed tree is never silently ignored or cast.
    """
    where = "/".join(prefix) or "<root>"
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"the `lora` tree has a {type(tree).__name__} at '{where}', outside any "
            "{'a': array, 'b': array} node"
        )
    leaves = [k for k, v in tree.items() if not isinstance(v, Mapping)]
    if leaves:
        if set(tree) not in ({"a", "b"}, {"a", "b", "m"}) or len(leaves) != len(tree):
            raise ValueError(
                f"the `lora` node at '{where}' has keys {sorted(map(str, tree))}; a factor node "
                "is exactly {'a': (lead..., in..., r), 'b': (lead..., r, out...)}, plus "
                "'m': (lead..., out...) with DoRA"
            )
        for k in tree:
            dtype = getattr(tree[k], "dtype", None)
            dtype = np.dtype(dtype) if dtype is not None else np.asarray(tree[k]).dtype
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(
                    f"the `lora` factor '{where}/{k}' has dtype {dtype}; LoRA factors are "
                    "real floating point (cast them, e.g. to float32, if that is what you mean)"
                )
        yield prefix, tree
        return
    for k, v in tree.items():
        yield from factor_nodes(v, (*prefix, str(k)))
