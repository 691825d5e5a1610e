"""Optimizers that train the LoRA factors only: frozen leaves get zero update and no state."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import optax

from .linen import COLLECTION

TRAIN, FREEZE = "lora", "frozen"


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def trainable_mask(variables: Any, *, also_train: str | Sequence[str] | None = None) -> Any:
    """A pytree of bools like ``variables``: ``True`` for leaves under the top-level ``"lora"``
    collection (linen) or named ``lora_a``/``lora_b`` (an ``nnx.state``), and for ``params`` leaves whose ``/``-joined path (without the collection name)
    fully matches an ``also_train`` regex (e.g. a classifier head: ``r"classifier/.*"``)."""
    patterns = (also_train,) if isinstance(also_train, str) else tuple(also_train or ())

    def label(path, _):
        names = [_key_name(k) for k in path]
        if names and names[0] == COLLECTION:
            return True
        if "lora_a" in names or "lora_b" in names:  # an NNX state
            return True
        rest = "/".join(names[1:])
        return bool(names) and names[0] == "params" and any(re.fullmatch(p, rest) for p in patterns)

    return jax.tree_util.tree_map_with_path(label, variables)


def optimizer(
    tx: optax.GradientTransformation, *, also_train: str | Sequence[str] | None = None
) -> optax.GradientTransformation:
    """Wrap ``tx`` to train only the LoRA factors of a whole ``{"params", "lora"}`` tree.

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
