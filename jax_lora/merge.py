"""Fold the low-rank update into the weights (``W' = W + scale * a @ b``) and back out again.

A factor node ``{"a", "b"}`` at a module path (flax's ``Dense``/``DenseGeneral``/``Einsum``)
folds into that module's ``kernel``, stored ``(lead..., in..., out...)``. A node at a weight path
(``h/0/attn/c_attn/kernel``, ``emb/embedding``, ``mlp/gating_einsum``) folds into that weight in
its stored layout, whose axis roles come from the wrapped model (``merge(variables, wrapped,
*args)``), or from the shapes when only one role assignment fits.

Merging twice adds ``scale * a @ b`` twice, and unmerging params that were never merged
subtracts it from the pretrained weights: neither can be detected from the arrays. Keep the
adapted ``variables`` as the source of truth and merge from them once, for export or serving.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax.core import meta

from . import dora, factors, quant, weights
from .config import LoraConfig
from .targets import path_str


def _copy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _rebox(old: Any, value: Any) -> Any:
    """``value`` in ``old``'s partitioning box (if it had one)."""
    if quant.is_quantized(old):  # a quantized kernel: boxed like its codes, if they are
        return quant.rebox(old, value)
    return old.replace_boxed(value) if isinstance(old, meta.AxisMetadata) else value


def _layer(params: Any, path: tuple[str, ...], where: str) -> tuple[Any, str, bool]:
    """The mapping holding the weight a factor node at ``path`` adapts, the weight's key, and
    whether ``path`` names the weight itself (else a Dense-family layer's ``kernel``)."""
    node = params
    for i, k in enumerate(path):
        if not isinstance(node, Mapping) or k not in node:
            raise ValueError(
                f"`lora` has factors at '{where}' but `params` has no layer there"
                + (" (named adapters {name: tree}? pass one adapter's tree)" if i == 0 else ".")
            )
        if i == len(path) - 1 and not isinstance(node[k], Mapping):
            return node, k, True
        node = node[k]
    if not isinstance(node, Mapping) or "kernel" not in node:
        raise ValueError(
            f"`lora` has factors at '{where}' but `params` there is neither a weight nor a layer "
            "with a 'kernel'."
        )
    return node, "kernel", False


def _geometry(
    w_shape: tuple[int, ...],
    a: Any,
    b: Any,
    *,
    generic: bool,
    known: weights.WeightGeometry | None,
    where: str,
) -> weights.WeightGeometry:
    a_shape, b_shape = tuple(np.shape(a)), tuple(np.shape(b))
    fits = weights.geometry_from_shapes(w_shape, a_shape, b_shape)
    if not generic:  # a Dense-family kernel: (lead..., in..., out...) by construction
        fits = [g for g in fits if g.standard]
    elif known is not None:
        extra = len(w_shape) - len(known.shape)  # a scanned stack: the trace saw one layer
        if extra > 0 and tuple(w_shape[extra:]) == known.shape:
            lead = tuple(range(extra))
            shift = lambda axes: tuple(i + extra for i in axes)  # noqa: E731
            known = weights.WeightGeometry(
                tuple(w_shape), lead + shift(known.lead), shift(known.ins), shift(known.outs)
            )
        fits = [known] if known in fits else []
    what = "weight" if generic else "kernel"
    if not fits:
        raise ValueError(
            f"`lora` factors at '{where}' do not fit the {what}: a {a_shape} @ b {b_shape} vs "
            f"{what} {w_shape} (need a: (lead..., in..., r), b: (lead..., r, out...) with the "
            "weight's axes split into lead, in and out)."
        )
    if len(fits) > 1:
        options = ", ".join(g.describe() for g in fits)
        raise ValueError(
            f"the factors at '{where}' (a {a_shape}, b {b_shape}) fit the weight {w_shape} in "
            f"more than one way: {options}. Pass the wrapped model and an example input so the "
            "roles are read off the model: `jax_lora.merge(variables, wrapped, *args)`."
        )
    return fits[0]


def _apply(
    variables: Mapping[str, Any],
    config: LoraConfig,
    sign: float,
    known: Mapping[str, weights.WeightGeometry] | None = None,
) -> dict[str, Any]:
    if not isinstance(config, LoraConfig):
        raise TypeError(
            f"expected a jax_lora.LoraConfig or a wrapped model, got {type(config).__name__}"
        )
    if not isinstance(variables, Mapping):
        raise TypeError(f"`variables` must be a dict, got {type(variables).__name__}")
    for key in ("params", "lora"):
        if key not in variables:
            raise ValueError(
                f"`variables` has no {key!r} entry; pass {{'params': ..., 'lora': ...}}."
            )
    params = _copy(variables["params"])  # boxes (nn.Partitioned, ...) kept; math on the arrays
    for path, node in factors.factor_nodes(meta.unbox(variables["lora"])):
        where = path_str(path) or "<root>"
        holder, key, generic = _layer(params, path, where)
        boxed = holder[key]
        w = quant.dequantize(meta.unbox(boxed))  # a quantized base merges in its compute dtype
        a, b = node["a"], node["b"]
        rank = config.rank_for(path_str(path))  # rank_pattern, else rank
        if np.shape(a)[-1] != rank:
            raise ValueError(
                f"`lora` factors at '{where}' have rank {np.shape(a)[-1]} (a {np.shape(a)}), but "
                f"the config's rank there is {rank}: the scale alpha/rank would be wrong. Use "
                "the config the factors were made with."
            )
        geom = _geometry(
            tuple(np.shape(w)),
            a,
            b,
            generic=generic,
            known=(known or {}).get(where),
            where=where,
        )
        scale = sign * config.scale_for(path_str(path))
        dora.check_agrees(dora.MAGNITUDE in node, config.use_dora, where)
        if dora.MAGNITUDE in node:
            holder[key] = _rebox(boxed, dora.fold(w, node, scale, geom, where))
            continue
        holder[key] = _rebox(boxed, _fold(w, a, b, scale, geom))
    return params


def _fold(w: Any, a: Any, b: Any, scale: float, geom: weights.WeightGeometry) -> jax.Array:
    """``w + scale * a @ b`` in fp32, folded into ``w``'s stored layout and dtype."""
    d = weights.delta(geom, a, b, scale)
    return (w.astype(d.dtype) + d).astype(w.dtype)


def _target(config_or_wrapped: Any, args: tuple, kwargs: dict, variables: Any):
    """(config, known geometries) from a config or a wrapped model (traced on ``args``)."""
    from .linen import LoraWrapped, weight_geometries

    if isinstance(config_or_wrapped, LoraWrapped):
        known = weight_geometries(config_or_wrapped, variables, *args, **kwargs) if args else None
        return config_or_wrapped.config, known
    names = getattr(config_or_wrapped, "names", None)  # a MultiLoraWrapped (named adapters)
    if isinstance(names, tuple) and hasattr(config_or_wrapped, "adapters"):
        raise TypeError(
            f"this wrapper holds named adapters {', '.join(map(repr, names))}: use one at a time, "
            "{'params': v['params'], 'lora': v['lora'][name]} with its config "
            "dict(wrapped.adapters)[name]"
        )
    if args or kwargs:
        raise TypeError("example inputs are only used with a wrapped model: merge(v, wrapped, x)")
    return config_or_wrapped, None


def merge(variables: Any, config: Any = None, *args: Any, **kwargs: Any) -> Any:
    """Params for the *unwrapped* module with each adapted weight ``W`` replaced by
    ``W + scale * a @ b`` (computed in fp32, cast back to ``W``'s dtype, in ``W``'s layout).

    Args:
      variables: ``{"params": ..., "lora": ...}`` as made by a wrapped module.
      config: the `LoraConfig` the factors were trained with (gives ``scale``), or the wrapped
        model (`LoraWrapped`, which knows its config).
      *args, **kwargs: with a wrapped model, an example input: the model is traced (no
        compute) to read each weight's axis roles, which folding a weight used transposed
        (GPT-2's ``Conv1D``, a square ``(out, in)`` kernel) needs when its shapes are ambiguous.

    Returns:
      A new params tree with the same structure and partitioning boxes; ``variables`` is not
      modified. Merging twice adds the update twice (see the module docstring). A quantized
      base (`jax_lora.quantize`) comes back dense: adapted kernels as dequantized + ΔW, the
      others dequantized, in their compute dtype; ``jax_lora.quantize(merged, qtype)``
      re-quantizes.

    For an NNX model (``merge(model)``): a new plain model with merged kernels, no factors.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jax_lora
    >>> model, config = nn.Dense(16), jax_lora.LoraConfig(rank=4)
    >>> wrapped, x = jax_lora.wrap(model, config), jnp.ones((2, 8))
    >>> variables = wrapped.init(jax.random.key(0), x)
    >>> variables["lora"]["b"] = jnp.full((4, 16), 0.1)
    >>> merged = jax_lora.merge(variables, config)
    >>> bool(jnp.allclose(model.apply({"params": merged}, x), wrapped.apply(variables, x), atol=1e-5))
    True
    """
    from flax import nnx

    if isinstance(variables, nnx.Module):
        from .nnx import merge_nnx

        return merge_nnx(variables)
    cfg, known = _target(config, args, kwargs, variables)
    # a quantized base (QLoRA) merges into a plain model: every QArray, adapted or not, comes
    # back dense in its compute dtype (re-quantize with `jax_lora.quantize(merged, qtype)`)
    return quant.dequantize(_apply(variables, cfg, 1.0, known))


def unmerge(variables: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
    """The inverse of `merge`: ``W = W' - scale * a @ b`` for ``{"params": merged, "lora": ...}``
    (same arguments as `merge`).

    Exact up to floating-point rounding of the subtraction (in fp32). For NNX:
    ``unmerge(merged_model, adapted_model)`` (the factors come from the adapted model).
    """
    from flax import nnx

    if isinstance(variables, nnx.Module):
        from .nnx import unmerge_nnx

        return unmerge_nnx(variables, config)
    cfg, known = _target(config, args, kwargs, variables)
    return _apply(variables, cfg, -1.0, known)
