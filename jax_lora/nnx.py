"""LoRA for Flax NNX models: graph surgery on an existing, initialised model.

`wrap_nnx` gives each targeted ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` two
``nnx.LoRAParam`` factors (``lora_a: (lead..., in..., r)``, ``lora_b: (lead..., r, out...)``) and
switches the layer to a subclass whose ``__call__`` adds the same low-rank branch as the linen
path (`factors.branch`). The layer object, its kernel and bias Variables, and every path in the
model's state stay as they were; only ``lora_a``/``lora_b`` appear next to ``kernel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import factors
from .config import LoraConfig
from .linen import lora_enabled
from .targets import (
    check_all_matched,
    explicitly_targeted,
    is_target,
    path_str,
    unsupported_error,
)

SUPPORTED_NNX = (nnx.LinearGeneral, nnx.Linear, nnx.Einsum)
_CLASSES: dict[type, type] = {}  # base layer class -> its Lora subclass
_BASES: dict[type, type] = {}  # and back


def _call_geometry(
    layer: nnx.Module, x: jax.Array, args: tuple, kwargs: Mapping[str, Any]
) -> factors.Geometry:
    if isinstance(layer, nnx.Einsum):
        eq = kwargs.get("einsum_str") or (args[0] if args else None) or layer.einsum_str
        return factors.einsum_geometry(eq, tuple(layer.kernel_shape), layer.lora_path)
    if isinstance(layer, nnx.LinearGeneral):
        return factors.dense_geometry(
            x.shape, layer.out_features, layer.axis, tuple(layer.batch_axis.keys())
        )
    return factors.dense_geometry(x.shape, layer.out_features)


def _init_geometry(layer: nnx.Module, path: str) -> factors.Geometry:
    """Shapes of the factors, from the layer's own attributes (no input needed)."""
    if isinstance(layer, nnx.Einsum):
        if layer.einsum_str is None:
            raise ValueError(
                f"nnx.Einsum at '{path}' has no `einsum_str` set at construction; LoRA needs it to "
                "split the kernel into input and output axes."
            )
        return factors.einsum_geometry(layer.einsum_str, tuple(layer.kernel_shape), path)
    if isinstance(layer, nnx.LinearGeneral):
        return factors.Geometry(
            kind="dense",
            lead_shape=tuple(layer.batch_axis.values()),
            in_shape=tuple(layer.in_features),
            out_shape=tuple(layer.out_features),
        )
    return factors.Geometry(
        kind="dense", lead_shape=(), in_shape=(layer.in_features,), out_shape=(layer.out_features,)
    )


def _stacked(geom: factors.Geometry, layer: nnx.Module, path: str) -> factors.Geometry:
    """Layers made under ``nnx.vmap`` (run with ``nnx.scan``) hold kernels with extra leading
    (layer) axes; the factors get the same axes: ``a: (L, in..., r)``, ``b: (L, r, out...)``."""
    kernel = tuple(layer.kernel.shape)
    per_layer = geom.lead_shape + geom.in_shape + geom.out_shape
    extra = len(kernel) - len(per_layer)
    if extra < 0 or kernel[extra:] != per_layer:
        raise ValueError(
            f"the kernel at '{path}' has shape {kernel}, expected (stack..., {per_layer})"
        )
    return dataclasses.replace(geom, lead_shape=kernel[:extra] + geom.lead_shape)


def _factor_metadata(layer: nnx.Module, geom: factors.Geometry) -> tuple[dict, dict]:
    """Partitioning for ``lora_a``/``lora_b`` inherited from the kernel's metadata, as in linen:
    ``a`` takes the (leading and) input-axis names, ``b`` the output-axis names; the rank axis is
    replicated. Empty when the kernel carries no names."""
    meta = dict(layer.kernel.get_metadata())
    key = next((k for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)), None)
    names = meta.get(key) if key else None
    if names is None or len(names) != layer.kernel.ndim:
        return {}, {}
    n = len(geom.lead_shape) + len(geom.in_shape)
    return {**meta, key: (*names[:n], None)}, {
        **meta,
        key: (*names[: len(geom.lead_shape)], None, *names[n:]),
    }


def lora_class(base: type) -> type:
    """The adapted subclass of ``base`` (one per base class, so jit caches stay valid)."""
    if base in _CLASSES:
        return _CLASSES[base]

    def __call__(self, inputs, *args, **kwargs):
        y = base.__call__(self, inputs, *args, **kwargs)
        if not (self.lora_enabled and lora_enabled()):
            return y
        geom = _call_geometry(self, inputs, args, kwargs)
        x = inputs.astype(y.dtype)
        if self.lora_dropout > 0 and not self.deterministic and self.lora_rngs is not None:
            x = factors.dropout(x, self.lora_dropout, self.lora_rngs.dropout())
        return y + factors.branch(
            x, self.lora_a[...], self.lora_b[...], geom, self.lora_scale, self.precision
        )

    cls = type(
        f"Lora{base.__name__}",
        (base,),
        {
            "__call__": __call__,
            "__module__": __name__,
            "__doc__": f"{base.__name__} + LoRA (made by jax_lora.wrap).",
        },
    )
    _CLASSES[base] = cls
    _BASES[cls] = base
    return cls


def is_adapted(layer: Any) -> bool:
    return type(layer) in _BASES


def _owns_params(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _modules(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield path_str(path), node


def wrap_nnx(model: nnx.Module, config: LoraConfig, *, rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Add LoRA to an initialised NNX model, in place; returns ``model``.

    Args:
      model: any ``nnx.Module``; layers are found by their ``/``-joined attribute path
        (``"blocks/0/attn/query"``).
      config: the `LoraConfig`.
      rngs: ``nnx.Rngs`` for the ``a`` init and for LoRA dropout (stream ``dropout``);
        default ``nnx.Rngs(0)``.

    The factors are ``nnx.LoRAParam``: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
    ``nnx.DiffState(0, nnx.LoRAParam)`` select them. Dropout follows ``model.train()`` /
    ``model.eval()`` (each adapted layer's ``deterministic`` attribute).

    >>> import jax.numpy as jnp, jax_lora
    >>> from flax import nnx
    >>> model = jax_lora.wrap(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), jax_lora.LoraConfig(rank=4))
    >>> model.lora_a.shape, model.lora_b.shape, type(model).__name__
    ((8, 4), (4, 16), 'LoraLinear')
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected an nnx.Module, got {type(model).__name__}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    candidates, targets = [], []
    for path, module in _modules(model):
        if isinstance(module, SUPPORTED_NNX):
            candidates.append((path, type(module).__name__))
            if is_target(config, path):
                if is_adapted(module):
                    raise ValueError(
                        f"the layer at '{path}' already has LoRA factors; unwrap or merge first"
                    )
                targets.append((path, module))
        elif explicitly_targeted(config, path) and _owns_params(module):
            raise unsupported_error(path, type(module).__name__)
    check_all_matched(config, candidates)
    for path, layer in targets:
        geom = _stacked(_init_geometry(layer, path), layer, path)
        factors.check_rank(geom, config.rank, path)
        meta_a, meta_b = _factor_metadata(layer, geom)
        layer.lora_a = nnx.LoRAParam(factors.init_a(rngs.params(), geom, config), **meta_a)
        layer.lora_b = nnx.LoRAParam(factors.init_b(geom, config), **meta_b)
        layer.lora_scale = config.scale
        layer.lora_dropout = config.dropout
        layer.lora_rngs = rngs if config.dropout > 0 else None
        layer.lora_enabled = True
        layer.lora_path = path
        if not hasattr(layer, "deterministic"):
            layer.deterministic = False
        object.__setattr__(layer, "__class__", lora_class(type(layer)))
    return model


def adapted_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer)]`` for every layer that carries LoRA factors."""
    return [(p, m) for p, m in _modules(model) if is_adapted(m)]


def set_enabled(model: nnx.Module, enabled: bool) -> None:
    """Switch every adapted layer's LoRA branch on or off (a static attribute: retraces)."""
    for _, layer in adapted_layers(model):
        layer.lora_enabled = enabled


def lora_state(model: nnx.Module) -> dict[str, Any]:
    """The factors as the linen-style ``lora`` tree ``{path...: {"a", "b"}}`` (arrays), ready for
    `AdapterCheckpointer.save` and `export_peft`."""
    out: dict[str, Any] = {}
    for path, layer in adapted_layers(model):
        node = out
        for part in path.split("/") if path else []:
            node = node.setdefault(part, {})
        node.update(a=layer.lora_a[...], b=layer.lora_b[...])
    return out


def load_lora(model: nnx.Module, lora: Mapping[str, Any]) -> None:
    """Set the factors of an adapted ``model`` from a ``lora`` tree (as `lora_state` gives, or
    restored from a checkpoint / imported from PEFT); every layer and shape must match."""
    from .checkpoint import check_same_layout

    check_same_layout(lora, lora_state(model), "`lora` tree")
    flat = {path_str(p): n for p, n in factors.factor_nodes(lora)}
    for path, layer in adapted_layers(model):
        layer.lora_a[...] = jnp.asarray(flat[path]["a"], layer.lora_a[...].dtype)
        layer.lora_b[...] = jnp.asarray(flat[path]["b"], layer.lora_b[...].dtype)


def _fold(model: nnx.Module, sign: float, source: nnx.Module | None = None) -> nnx.Module:
    out = nnx.clone(model)
    src = dict(adapted_layers(source if source is not None else out))
    for path, layer in _modules(out):
        if path not in src:
            continue
        f = src[path]
        layer.kernel[...] = factors.fold(
            layer.kernel[...], f.lora_a[...], f.lora_b[...], sign * f.lora_scale
        )
        if is_adapted(layer):
            object.__setattr__(layer, "__class__", _BASES[type(layer)])
            for name in (
                "lora_a",
                "lora_b",
                "lora_scale",
                "lora_dropout",
                "lora_rngs",
                "lora_enabled",
                "lora_path",
            ):
                delattr(layer, name)
    return out


def merge_nnx(model: nnx.Module) -> nnx.Module:
    """A new plain model (no factors, the base classes back) with ``W + scale * a @ b``;
    ``model`` is not modified."""
    if not adapted_layers(model):
        raise ValueError("the model has no LoRA factors to merge")
    return _fold(model, 1.0)


def unmerge_nnx(merged: nnx.Module, adapted: nnx.Module) -> nnx.Module:
    """The inverse of `merge_nnx`: a new plain model with ``W' - scale * a @ b``, the factors
    taken from ``adapted`` (the model that was merged)."""
    return _fold(merged, -1.0, adapted)


def param_counts(model: nnx.Module) -> tuple[int, int]:
    """(LoRA factor count, count of all ``nnx.Param``s, factors included: LoRAParam is one)."""
    lora = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    total = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return lora, total
