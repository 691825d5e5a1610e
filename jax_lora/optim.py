"""Optimizers that train the LoRA factors only: frozen leaves get zero update and no state."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from . import quant
from .trees import COLLECTION, key_name

TRAIN, FREEZE = "lora", "frozen"
GROUP_A, GROUP_B, GROUP_EMBEDDING = "lora_a", "lora_b", "lora_embedding"  # LoRA+ groups


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


def _check_not_quantized(patterns: tuple[str, ...], quantized: Mapping[str, Any]) -> None:
    """A quantized weight's codes cannot be trained (an optimizer step on them fails deep in
    optax, or would build state for them): a pattern reaching one is refused by path."""
    for pattern in patterns:
        for path, q in quantized.items():
            arrays = jax.tree_util.tree_flatten_with_path(q)[0]  # codes, scales, statistics
            subs = [path] + [f"{path}/{'/'.join(key_name(k) for k in kp)}" for kp, _ in arrays]
            if any(re.fullmatch(pattern, p) for p in subs):
                raise ValueError(
                    f"`also_train` pattern {pattern!r} matches the quantized weight '{path}' "
                    f"({q.qtype}, shape {tuple(q.shape)}): its codes are frozen (LoRA adapts "
                    "it). Narrow the pattern to the layer's float params (e.g. "
                    f"'{path.rpartition('/')[0] or path}/bias'), or `dequantize` it to train it."
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
    quantized = {
        p: v.get_value()
        for p, (_, v) in zip(paths, leaves, strict=True)
        if isinstance(v, nnx.Param) and quant.is_quantized(v.get_value())
    }
    _check_not_quantized(patterns, quantized)
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
    params = jax.tree_util.tree_flatten_with_path(
        variables.get("params", {}), is_leaf=quant.is_quantized
    )[0]
    paths = ["/".join(key_name(k) for k in path) for path, _ in params]
    quantized = {p: v for p, (_, v) in zip(paths, params, strict=True) if quant.is_quantized(v)}
    _check_not_quantized(patterns, quantized)
    _check_matched(patterns, paths)

    def label(path, _):
        names = [key_name(k) for k in path]
        if names[0] == COLLECTION:
            return True
        rest = "/".join(names[1:])
        return names[0] == "params" and any(re.fullmatch(p, rest) for p in patterns)

    return jax.tree_util.tree_map_with_path(label, dict(variables))


EMBEDDING_MARK = "lora_embedding"
"""NNX: the metadata flag `wrap_nnx` sets on the factors of an ``nnx.Embed`` table."""


def _embedding_nodes(tree: Mapping[str, Any]) -> set[tuple[str, ...]] | None:
    """Linen: the ``lora`` node paths that adapt an embedding table: a node at a *weight* path
    (``params`` holds an array there, not a layer's dict) named ``embedding``, the only param of
    its layer, as flax's ``nn.Embed`` stores it. A Dense layer named ``embedding`` has its node
    at the layer path (``params`` holds ``{"kernel", ...}`` there), so it is not one; nor is a
    layer's own weight ``embedding`` next to other params. None without ``params``."""
    if "params" not in tree:
        return None
    found = set()
    for path, _ in jax.tree_util.tree_flatten_with_path(tree[COLLECTION])[0]:
        node = tuple(key_name(k) for k in path)[:-1]  # without the leaf name (a, b or m)
        if not node or node[-1] != "embedding":
            continue
        layer: Any = tree["params"]
        for k in node[:-1]:
            layer = layer.get(k) if isinstance(layer, Mapping) else None
        # nn.Embed's params are exactly {"embedding": table}; a layer's own matmul weight named
        # so next to other params (a bias) is not a table (one alone still reads as one)
        is_table = isinstance(layer, Mapping) and set(layer) == {"embedding"}
        if is_table and not isinstance(layer["embedding"], Mapping):
            found.add(node)
    return found


def _loraplus_group(path: tuple, value: Any, embeddings: set | None = None) -> str:
    """PEFT's ``create_loraplus_optimizer`` groups: factors of an embedding table (PEFT's
    ``isinstance(module, Embedding)``: linen, see `_embedding_nodes`; NNX, the factors of an
    ``nnx.Embed``, marked at wrap time), every other ``b`` and trainable 1-D param (biases),
    every other ``a``."""
    names = [key_name(k) for k in path]
    leaf = names[-1]
    mark = None
    if isinstance(value, nnx.Variable):
        mark = bool(value.get_metadata().get(EMBEDDING_MARK, False))
        value = value.get_value()
    if names[0] == COLLECTION:  # linen: lora/<layer or weight path>/(a|b|m)
        if leaf == "m":  # DoRA's magnitude: PEFT's 1-D lora_magnitude_vector, group B
            return GROUP_B
        node = tuple(names[1:-1])
        if (node in embeddings) if embeddings is not None else node[-1:] == ("embedding",):
            return GROUP_EMBEDDING
        return GROUP_B if leaf == "b" else GROUP_A
    if leaf == "lora_m" or leaf.endswith("_lora_m"):  # NNX DoRA magnitude (any lead axes)
        return GROUP_B
    if mark is not None and leaf.endswith(("lora_a", "lora_b")):  # NNX factors: by their mark
        if mark:
            return GROUP_EMBEDDING
    elif leaf in ("embedding_lora_a", "embedding_lora_b"):  # plain arrays: by name
        return GROUP_EMBEDDING
    if leaf.endswith("lora_b") or np.ndim(value) == 1:
        return GROUP_B
    return GROUP_A


def _plain_factor_groups(state: nnx.State, seen: Mapping[tuple[str, ...], str]) -> Any:
    """Groups of a plain-array NNX state (``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``
    passes one to ``update``): every leaf must be a factor, in the group read off its Variable
    (``seen``, from ``init``'s Variable state), else told apart by its name."""

    def group(path, v):
        name = key_name(path[-1])
        factor = ("lora_a", "lora_b", "lora_m")  # lora_m: DoRA's magnitude
        if not (name in factor or name.endswith(tuple("_" + f for f in factor))):
            raise ValueError(
                f"LoRA+ got a plain-array nnx.State with the non-factor leaf "
                f"'{'/'.join(key_name(k) for k in path)}': use "
                "nnx.Optimizer(model, tx, wrt=nnx.LoRAParam), or pass nnx.state(model, nnx.Param) "
                "to the optimizer's init/update yourself."
            )
        known = seen.get(tuple(key_name(k) for k in path))
        return known if known is not None else _loraplus_group(path, v)

    return jax.tree_util.tree_map_with_path(group, state)


def _positive(x: Any) -> bool:
    """``x`` is a real scalar (Python or numpy), finite and > 0."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        return False
    return bool(np.isfinite(x) and x > 0)


def _loraplus(
    make: Callable[..., optax.GradientTransformation],
    lr: Any,
    ratio: float,
    lr_embedding: Any,
    also_train: str | Sequence[str] | None,
) -> optax.GradientTransformation:
    if not callable(make) or isinstance(make, optax.GradientTransformation):
        raise TypeError(
            "with `loraplus_lr_ratio`, pass the optimizer as a function of the learning rate "
            "(e.g. `optax.adam` or `functools.partial(optax.adamw, weight_decay=0.01)`), not a "
            f"built optimizer: it is built once per learning-rate group; got {make!r}"
        )
    if lr is None:
        raise TypeError("`loraplus_lr_ratio` needs `learning_rate` (the learning rate of `a`)")
    if not _positive(ratio):
        raise ValueError(
            f"`loraplus_lr_ratio` must be a number > 0 and finite (PEFT: >= 1), got {ratio!r}"
        )
    if not callable(lr) and not _positive(lr):
        raise ValueError(
            f"`learning_rate` must be a finite number > 0 or an optax schedule, got {lr!r}"
        )
    b_lr = (lambda step: lr(step) * ratio) if callable(lr) else lr * ratio

    # NNX: the groups read off Variables (an nnx.Embed's mark), by path, for the plain-array
    # states nnx.Optimizer passes to `update` (it passes Variables to `init`)
    seen: dict[tuple[str, ...], str] = {}

    def labels(tree):
        if isinstance(tree, nnx.State) and not any(
            _is_variable(v) for v in jax.tree.leaves(tree, is_leaf=_is_variable)
        ):
            return _plain_factor_groups(tree, seen)
        mask = trainable_mask(tree, also_train=also_train)
        emb = None if isinstance(tree, nnx.State) else _embedding_nodes(tree)

        def label(path, m, v):
            group = _loraplus_group(path, v, emb) if m else FREEZE
            if isinstance(tree, nnx.State):
                seen[tuple(key_name(k) for k in path)] = group
            return group

        return jax.tree_util.tree_map_with_path(
            label, mask, tree, is_leaf=lambda x: isinstance(x, bool)
        )

    groups = {
        GROUP_A: make(lr),
        GROUP_B: make(b_lr),
        GROUP_EMBEDDING: make(lr_embedding),
        FREEZE: optax.set_to_zero(),
    }
    return optax.multi_transform(groups, labels)


def optimizer(
    tx: optax.GradientTransformation | Callable[..., optax.GradientTransformation],
    *,
    also_train: str | Sequence[str] | None = None,
    loraplus_lr_ratio: float | None = None,
    learning_rate: float | optax.Schedule | None = None,
    loraplus_lr_embedding: float | optax.Schedule = 1e-6,
) -> optax.GradientTransformation:
    """Wrap ``tx`` to train only the LoRA factors of a whole ``{"params", "lora"}`` tree (linen)
    or of ``nnx.state(model, nnx.Param)`` (NNX), plus the params ``also_train`` matches.

    LoRA+ (arXiv 2402.12354; PEFT's ``create_loraplus_optimizer``): with ``loraplus_lr_ratio``
    ``λ``, ``tx`` is a function of the learning rate (``optax.adam``, or
    ``functools.partial(optax.adamw, weight_decay=wd)``) and is built once per PEFT group: ``a``
    factors at ``learning_rate``, ``b`` factors, DoRA magnitudes ``m`` (PEFT: a 1-D
    ``lora_magnitude_vector``; its Conv's ``(1, out, 1, 1)`` one falls in group A by its shape) and trainable 1-D params such as biases from
    ``also_train`` at ``λ * learning_rate``, both factors of an embedding table (linen: a ``lora`` node at an
    ``nn.Embed``-style weight path ``.../embedding``, told from a Dense layer named so by the
    ``params`` tree; NNX: an ``nnx.Embed``'s, marked at wrap time; a plain-array NNX state
    (``nnx.Optimizer``'s ``update``): the groups ``init`` read off its Variables, else
    ``embedding_lora_a``/``_b`` by name) at ``loraplus_lr_embedding`` (PEFT's default ``1e-6``). PEFT's
    ``loraplus_weight_decay`` is the ``weight_decay`` given to ``tx`` here (PEFT also drops it
    for biases, this does not). NNX: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.

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

    if loraplus_lr_ratio is not None:
        return _loraplus(tx, learning_rate, loraplus_lr_ratio, loraplus_lr_embedding, also_train)
    if learning_rate is not None:
        raise TypeError("`learning_rate` is only used with `loraplus_lr_ratio`")

    def labels(tree):
        return jax.tree.map(
            lambda t: TRAIN if t else FREEZE, trainable_mask(tree, also_train=also_train)
        )

    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)
