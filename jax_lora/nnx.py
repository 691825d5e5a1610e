"""LoRA for Flax NNX models: graph surgery on an existing, initialised model.

`wrap_nnx` gives each targeted ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` two
``nnx.LoRAParam`` factors (``lora_a: (lead..., in..., r)``, ``lora_b: (lead..., r, out...)``) and
switches the layer to a subclass whose ``__call__`` adds the same low-rank branch as the linen
path (`factors.branch`). The layer object, its kernel and bias Variables, and every path in the
model's state stay as they were; only ``lora_a``/``lora_b`` appear next to ``kernel``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import factors
from .config import LoraConfig
from .linen import LoraWrapped, lora_enabled
from .targets import (
    check_all_matched,
    explicitly_targeted,
    is_target,
    path_str,
    unsupported_error,
)

SUPPORTED_NNX = (nnx.LinearGeneral, nnx.Linear, nnx.Einsum)


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


class _LoraLayer(nnx.Module):
    """The LoRA ``__call__`` in front of a base layer class (``class LoraX(_LoraLayer, X)``;
    an ``nnx.Module`` so that the object layout matches and ``__class__`` can be switched).

    `wrap_nnx` sets, per layer: ``lora_a``/``lora_b`` (``nnx.LoRAParam``), ``lora_scale``,
    ``lora_dropout``, ``lora_rngs`` (this layer's own dropout ``nnx.RngStream``, or ``None``),
    ``lora_enabled``, ``lora_path``, ``deterministic`` (unless the layer has its own), and
    ``lora_injected`` (the names it added, removed again by `merge_nnx`).
    """

    if TYPE_CHECKING:
        lora_a: nnx.LoRAParam
        lora_b: nnx.LoRAParam
        lora_scale: float
        lora_dropout: float
        lora_rngs: nnx.RngStream | None
        lora_enabled: bool
        lora_path: str
        lora_injected: tuple[str, ...]
        deterministic: bool
        precision: Any

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        y = super().__call__(inputs, *args, **kwargs)  # type: ignore[misc]
        if not (self.lora_enabled and lora_enabled()):
            return y
        geom = _call_geometry(self, inputs, args, kwargs)  # type: ignore[arg-type]
        x = inputs.astype(y.dtype)
        if self.lora_dropout > 0 and not self.deterministic and self.lora_rngs is not None:
            x = factors.dropout(x, self.lora_dropout, self.lora_rngs())
        return y + factors.branch(
            x, self.lora_a[...], self.lora_b[...], geom, self.lora_scale, self.precision
        )

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view(model, deterministic=...)`` reaches LoRA dropout (as ``nnx.Dropout``)."""
        if deterministic is not None:
            self.deterministic = deterministic


class LoraLinear(_LoraLayer, nnx.Linear):
    """``nnx.Linear`` + LoRA: ``y = x @ W + b + scale * dropout(x) @ a @ b`` with
    ``a: (in, r)``, ``b: (r, out)``. Made in place by `wrap_nnx`."""


class LoraLinearGeneral(_LoraLayer, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` + LoRA: ``a: (batch..., in..., r)``, ``b: (batch..., r, out...)``.
    Made in place by `wrap_nnx`."""


class LoraEinsum(_LoraLayer, nnx.Einsum):
    """``nnx.Einsum`` + LoRA, the kernel split into input and output axes by ``einsum_str``.
    Made in place by `wrap_nnx`."""


# base layer class -> its LoRA class, and back. Other classes (a user's subclass of a supported
# layer) get a class made once per base by `lora_class`.
_CLASSES: dict[type, type] = {
    nnx.Linear: LoraLinear,
    nnx.LinearGeneral: LoraLinearGeneral,
    nnx.Einsum: LoraEinsum,
}
_BASES: dict[type, type] = {v: k for k, v in _CLASSES.items()}
_GENERATED = "_Lora["  # qualname prefix of made classes: _Lora[<module>:<qualname>], "." as "/"


def lora_class(base: type) -> type:
    """The LoRA class for layer class ``base``: a module-level class for flax's layers, else
    one made (once per base, so jit caches stay valid) and pickled by name.

    A made class is ``jax_lora.nnx._Lora[<base module>:<base qualname>]`` (dots written as
    ``/``); this module's ``__getattr__`` rebuilds it from that name, so pickle, and anything
    that finds classes by module and qualname, works for any importable ``base``."""
    if base in _CLASSES:
        return _CLASSES[base]
    if base in _BASES:
        raise ValueError(f"{base.__name__} is already a LoRA class")
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"{_GENERATED}{base.__module__}:{base.__qualname__}]".replace(".", "/"),
        "__doc__": f"{base.__name__} + LoRA (made by jax_lora.wrap).",
    }
    if "set_view" in dir(base):  # the base's own view switches stay; they set `deterministic`
        attrs["set_view"] = base.set_view
    cls = type(f"Lora{base.__name__}", (_LoraLayer, base), attrs)
    _CLASSES[base] = cls
    _BASES[cls] = base
    return cls


def __getattr__(name: str) -> type:
    """PEP 562: rebuild a class made by `lora_class` from its qualname (for pickle)."""
    if name.startswith(_GENERATED) and name.endswith("]"):
        module_name, _, qualname = name[len(_GENERATED) : -1].replace("/", ".").partition(":")
        base: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            base = getattr(base, part)
        return lora_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    ``nnx.DiffState(0, nnx.LoRAParam)`` select them. Flax's layers become `LoraLinear`,
    `LoraLinearGeneral`, `LoraEinsum`; a subclass of them gets a class made by `lora_class`.

    LoRA dropout runs exactly when the model runs in training mode: each adapted layer's
    ``deterministic`` attribute, set by ``model.train()`` / ``model.eval()``,
    ``set_attributes(deterministic=...)``, ``nnx.with_attributes`` and ``nnx.view``. At wrap
    time a layer takes the model's current mode: its own ``deterministic`` if it has one, else
    that of the module (an ``nnx.Dropout``, say) whose path shares the longest prefix with the
    layer's (the first such in graph order on a tie), else training (``False``, as a new
    ``nnx.Dropout``). Each layer draws its masks from its own ``nnx.RngStream``, forked from
    ``rngs.dropout`` (split along the stack axes for a stacked layer), so masks differ between
    layers and do not depend on which other layers ran.

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
    modes = [
        (path.split("/") if path else [], m.deterministic)
        for path, m in _modules(model)
        if isinstance(getattr(m, "deterministic", None), bool)
    ]
    for path, layer in targets:
        geom = _stacked(_init_geometry(layer, path), layer, path)
        factors.check_rank(geom, config.rank, path)
        meta_a, meta_b = _factor_metadata(layer, geom)
        layer.lora_a = nnx.LoRAParam(factors.init_a(rngs.params(), geom, config), **meta_a)
        layer.lora_b = nnx.LoRAParam(factors.init_b(geom, config), **meta_b)
        layer.lora_scale = config.scale
        layer.lora_dropout = config.dropout
        stack = geom.lead_shape[
            : len(geom.lead_shape) - len(_init_geometry(layer, path).lead_shape)
        ]
        layer.lora_rngs = (
            (rngs.dropout.split(stack) if stack else rngs.dropout.fork())
            if config.dropout > 0
            else None
        )
        layer.lora_enabled = True
        layer.lora_path = path
        injected = ["lora_a", "lora_b", "lora_scale", "lora_dropout", "lora_rngs"]
        injected += ["lora_enabled", "lora_path", "lora_injected"]
        if not hasattr(layer, "deterministic"):
            layer.deterministic = _current_mode(modes, path)
            injected.append("deterministic")
        layer.lora_injected = tuple(injected)
        object.__setattr__(layer, "__class__", lora_class(type(layer)))
    return model


def _current_mode(modes: list[tuple[list[str], bool]], path: str) -> bool:
    """``deterministic`` of the module whose path shares the longest prefix with ``path``."""
    parts = path.split("/") if path else []

    def shared(p: list[str]) -> int:
        n = 0
        while n < min(len(p), len(parts)) and p[n] == parts[n]:
            n += 1
        return n

    best = max(modes, key=lambda m: shared(m[0]), default=None)  # max keeps the first on ties
    return best[1] if best is not None else False


def adapted_layers(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer)]`` for every layer that carries LoRA factors."""
    return [(p, m) for p, m in _modules(model) if is_adapted(m)]


def set_enabled(model: Any, enabled: bool) -> Any:
    """Switch LoRA on or off; returns the switched model (``model = set_enabled(model, False)``
    works for both).

    - NNX: flips every adapted layer of ``model`` in place (a static attribute: jit retraces)
      and returns ``model``.
    - linen: returns ``model.clone(enabled=enabled)`` for a `LoraWrapped`; linen modules are
      immutable, so ``model`` itself is unchanged.

    `jax_lora.disabled` is the context-manager form, for both.
    """
    if isinstance(model, LoraWrapped):
        return model.clone(enabled=enabled)
    if not isinstance(model, nnx.Module):
        raise TypeError(
            "set_enabled takes an NNX model adapted by `jax_lora.wrap` or a linen `LoraWrapped`, "
            f"got {type(model).__name__}"
        )
    for _, layer in adapted_layers(model):
        layer.lora_enabled = enabled
    return model


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
            for name in layer.lora_injected:
                delattr(layer, name)
            object.__setattr__(layer, "__class__", _BASES[type(layer)])
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
