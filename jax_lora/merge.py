"""Fold the low-rank update into the kernels (``W' = W + scale * a @ b``) and back out again."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax.core import meta

from . import factors
from .config import LoraConfig
from .targets import path_str


def _copy(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _copy(v) for k, v in tree.items()}
    return tree


def _apply(variables: Mapping[str, Any], config: LoraConfig, sign: float) -> dict[str, Any]:
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jax_lora.LoraConfig, got {type(config).__name__}")
    for key in ("params", "lora"):
        if key not in variables:
            raise ValueError(
                f"`variables` has no {key!r} entry; pass {{'params': ..., 'lora': ...}}."
            )
    # partitioning boxes (nn.LogicallyPartitioned, ...) are metadata: work on the arrays
    params = _copy(meta.unbox(variables["params"]))
    for path, node in factors.factor_nodes(meta.unbox(variables["lora"])):
        where = path_str(path) or "<root>"
        layer = params
        for k in path:
            if not isinstance(layer, Mapping) or k not in layer:
                raise ValueError(
                    f"`lora` has factors at '{where}' but `params` has no layer there."
                )
            layer = layer[k]
        if "kernel" not in layer:
            raise ValueError(f"`lora` has factors at '{where}' but `params` there has no 'kernel'.")
        w = layer["kernel"]
        a, b = node["a"], node["b"]
        n_lead = a.ndim + b.ndim - 2 - w.ndim
        lead = a.shape[:n_lead]
        want = a.shape[:-1] + b.shape[n_lead + 1 :]
        if (
            n_lead < 0
            or b.shape[:n_lead] != lead
            or a.shape[-1] != b.shape[n_lead]
            or tuple(w.shape) != want
        ):
            raise ValueError(
                f"`lora` factors at '{where}' do not fit the kernel: a {tuple(a.shape)} @ "
                f"b {tuple(b.shape)} vs kernel {tuple(w.shape)} (need a: (lead..., in..., r), "
                "b: (lead..., r, out...), kernel: (lead..., in..., out...))."
            )
        layer["kernel"] = factors.fold(w, a, b, sign * config.scale)
    return params


def merge(variables: Any, config: LoraConfig | None = None) -> Any:
    """Params for the *unwrapped* module with each adapted kernel ``W`` replaced by
    ``W + scale * a @ b`` (computed in fp32, cast back to ``W``'s dtype).

    Args:
      variables: ``{"params": ..., "lora": ...}`` as made by a wrapped module.
      config: the `LoraConfig` the factors were trained with (gives ``scale``).

    Returns:
      A new params tree; ``variables`` is not modified.

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
    return _apply(variables, config, 1.0)


def unmerge(variables: Any, config: Any) -> Any:
    """The inverse of `merge`: ``W = W' - scale * a @ b`` for ``{"params": merged, "lora": ...}``.

    Exact up to floating-point rounding of the subtraction (in fp32). For NNX:
    ``unmerge(merged_model, adapted_model)`` (the factors come from the adapted model).
    """
    from flax import nnx

    if isinstance(variables, nnx.Module):
        from .nnx import unmerge_nnx

        return unmerge_nnx(variables, config)
    return _apply(variables, config, -1.0)
