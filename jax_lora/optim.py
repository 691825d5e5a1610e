"""Optimizers that train the LoRA factors only: frozen leaves get zero update and no state."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax
from flax import nnx

from .trees import COLLECTION, key_name

TRAIN, FREEZE = "lora", "frozen"


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _check_matched(patterns: tuple[str, ...], paths: list[str]) -> None:
    for pattern in patterns:
        if not any(re.fullmatch(pattern, p) for p in paths):
            listing = "\n".join(f"  {p}" for p in paths[:50])
            if len(paths) > 50:
                listing += f"\n  ... and {len(paths) - 50} more"
            raise ValueError(
                f"`also_train` pattern {pattern!r} matches no param (patterns are matched with "
                "re.fullmatch against the '/'-joined param path, without the collection name, "
                f"e.g. 'head/kernel' or r'head/.*'). Candidate paths:\n{listing}"
            )


def _patterns(also_train: str | Sequence[str] | None) -> tuple[str, ...]:
    patterns = (also_train,) if isinstance(also_train, str) else tuple(also_train or ())
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"`also_train` entries must be regex strings, got {p!r}")
    return patterns


def _nnx_mask(state: nnx.State, patterns: tuple[str, ...]) -> Any:
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
    if leaves and not any(_is_variable(v) for _, v in leaves):
        raise ValueError(
            "this nnx.State holds plain arrays (e.g. from nnx.as_pure, or inside "
            "nnx.Optimizer.update), so its LoRA factors cannot be told apart by type. Pass "
            "nnx.state(model, nnx.Param) to jax_lora.optimizer's init/update, or use "
            "nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)."
        )
    paths = ["/".join(key_name(k) for k in path) for path, v in leaves if _is_variable(v)]
    frozen = [
        p
        for p, (_, v) in zip(paths, leaves, strict=True)
        if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)
    ]
    _check_matched(patterns, frozen)

    def label(path, v):
        if isinstance(v, nnx.LoRAParam):
            return True
        name = "/".join(key_name(k) for k in path)
        return isinstance(v, nnx.Param) and any(re.fullmatch(p, name) for p in patterns)

    return jax.tree_util.tree_map_with_path(label, state, is_leaf=_is_variable)


def trainable_mask(variables: Any, *, also_train: str | Sequence[str] | None = None) -> Any:
    """A pytree of bools, ``True`` for the leaves `optimizer` trains, decided by type:

    - a linen variables dict ``{"params": ..., "lora": ...}``: every leaf of the top-level
      ``"lora"`` collection (and nothing named ``lora`` deeper down);
    - an ``nnx.State`` (``nnx.state(model)`` or ``nnx.state(model, nnx.Param)``): every
      ``nnx.LoRAParam`` variable (one bool per variable).

    ``also_train`` regexes additionally train the base params whose ``/``-joined path fully
    matches (linen: the path inside ``params``, e.g. ``r"head/.*"``; NNX: the attribute path,
    e.g. ``"head/kernel"``). A pattern that matches no param raises ``ValueError`` listing the
    candidate paths.
    """
    patterns = _patterns(also_train)
    if isinstance(variables, nnx.State):
        return _nnx_mask(variables, patterns)
    if not isinstance(variables, Mapping) or COLLECTION not in variables:
        keys = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
        raise ValueError(
            "trainable_mask needs a linen variables dict with a top-level 'lora' collection "
            "({'params': ..., 'lora': ...}) or an nnx.State from nnx.state(model); "
            f"got {keys}."
        )
    params = jax.tree_util.tree_flatten_with_path(variables.get("params", {}))[0]
    _check_matched(patterns, ["/".join(key_name(k) for k in path) for path, _ in params])

    def label(path, _):
        names = [key_name(k) for k in path]
        if names[0] == COLLECTION:
            return True
        rest = "/".join(names[1:])
        return names[0] == "params" and any(re.fullmatch(p, rest) for p in patterns)

    return jax.tree_util.tree_map_with_path(label, dict(variables))


def optimizer(
    tx: optax.GradientTransformation, *, also_train: str | Sequence[str] | None = None
) -> optax.GradientTransformation:
    """Wrap ``tx`` to train only the LoRA factors of a whole ``{"params", "lora"}`` tree (linen)
    or of ``nnx.state(model, nnx.Param)`` (NNX), plus the params ``also_train`` matches.

    Trainable leaves (see `trainable_mask`) get ``tx``'s update; every other leaf gets an
    update of exactly zero and no optimizer state (``optax.multi_transform`` with
    ``optax.set_to_zero``; unlike ``optax.masked``, which passes unmasked gradients through).

    Faster still is differentiating the ``lora`` tree alone and using plain ``tx`` on it; see
    the README.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jax_lora, optax
    >>> model = jax_lora.wrap(nn.Dense(16), jax_lora.LoraConfig(rank=4))
    >>> variables = model.init(jax.random.key(0), jnp.ones((1, 8)))
    >>> tx = jax_lora.optimizer(optax.adam(1e-3))
    >>> state = tx.init(variables)
    >>> sum(t.size for t in jax.tree.leaves(state) if t.dtype == jnp.float32)  # mu, nu of a, b
    192
    """

    def labels(tree):
        return jax.tree.map(
            lambda t: TRAIN if t else FREEZE, trainable_mask(tree, also_train=also_train)
        )

    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)
