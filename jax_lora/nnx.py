"""LoRA for Flax NNX models: graph surgery on an existing, initialised model.

`wrap_nnx` gives each targeted ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Einsum`` two
``nnx.LoRAParam`` factors (``lora_a: (lead..., in..., r)``, ``lora_b: (lead..., r, out...)``) and
switches the layer to a subclass whose ``__call__`` adds the same low-rank branch as the linen
path (`factors.branch`). Any other layer (``nnx.Conv``, ``nnx.Embed``, a user's layer with its
own ``nnx.Param``) gets ``<weight>_lora_a``/``<weight>_lora_b`` per targeted weight and a class
whose ``__call__`` traces the base method and adds the branch where the weight is contracted
(`jax_lora.weights`). The layer object, its Variables, and every path in the model's state stay
as they were; only the factors appear next to the weights.
"""

from __future__ import annotations

import contextvars
import dataclasses
import importlib
import itertools
import re
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import dora, factors, quant, quant_nnx, weights
from .config import LoraConfig
from .optim import EMBEDDING_MARK
from .switch import lora_enabled
from .switch import set_enabled as set_enabled
from .targets import (
    check_all_matched,
    class_name,
    explicitly_targeted,
    is_target,
    path_str,
    unsupported_error,
    weight_path,
    weight_targeted,
)
from .trees import check_same_layout

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


def _stack_fits(shape: tuple[int, ...], per_layer: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every placement (sorted axis positions in ``shape``) of the stack axes that leaves
    ``per_layer``: ``nnx.vmap`` records no ``out_axes``, so this is all the shape can say."""
    extra = len(shape) - len(per_layer)
    if extra < 0:
        return []
    return [
        pos
        for pos in itertools.combinations(range(len(shape)), extra)
        if tuple(d for i, d in enumerate(shape) if i not in pos) == per_layer
    ]


def _narrowed(
    fits: list[tuple[int, ...]],
    shape: tuple[int, ...],
    siblings: list[tuple[tuple[int, ...], tuple[int, ...]]],
) -> list[tuple[int, ...]]:
    """``fits`` less the stack axes that the layer's bias (same module, same ``nnx.vmap``, so
    the same ``out_axes``) rules out. ``siblings``: ``(stored shape, one layer's shape)``; a
    stack of ``L`` along axis ``p`` (or ``p - ndim``, counted from the end) puts ``L`` there and
    leaves one layer's shape. ``L == H`` layers of ``(H, hd, d)`` out-projection kernels:
    ``(H, H, hd, d)`` fits axes 0 and 1, its bias ``(L, d)`` only 0. Unchanged where nothing,
    or every fit, is ruled out (a bias shared by the layers, not stacked, fits none)."""

    def fits_sibling(pos: tuple[int, ...], sib: tuple[int, ...], one: tuple[int, ...]) -> bool:
        if len(pos) != 1:
            return True
        p = pos[0]
        return any(
            0 <= o < len(sib) and sib[o] == shape[p] and sib[:o] + sib[o + 1 :] == one
            for o in (p, len(sib) + p - len(shape))
        )

    out = [pos for pos in fits if all(fits_sibling(pos, s, one) for s, one in siblings)]
    return out or fits


def _bias_shapes(layer: nnx.Module, geom: factors.Geometry) -> list:
    """``[(bias shape, one layer's bias shape)]`` of a Linear/LinearGeneral (``batch + out``,
    as flax makes it; `_narrowed`), else ``[]``."""
    bias = getattr(layer, "bias", None)
    if not isinstance(layer, (nnx.Linear, nnx.LinearGeneral)) or not isinstance(bias, nnx.Param):
        return []
    return [(tuple(np.shape(bias.get_value())), geom.lead_shape + geom.out_shape)]


def _stack_position(
    shape: tuple[int, ...],
    per_layer: tuple[int, ...],
    stack_axis: int | None,
    what: str,
    siblings: list[tuple[tuple[int, ...], tuple[int, ...]]] = (),
) -> tuple[int, ...]:
    """The positions of the stack axes of a weight of ``shape`` (``()``: not stacked).

    ``stack_axis`` (`wrap_nnx`): the single stack axis (``nnx.vmap``'s ``out_axes``), ``0`` also
    for several leading ones; ``None``: read off the shapes, refused when they fit more than one
    placement (``D`` layers of ``(D, D)`` kernels stacked along axis 0, 1 or 2 look the same)
    after the ``siblings`` (`_narrowed`) have ruled out what they can."""
    fits = _stack_fits(shape, per_layer)
    if stack_axis is None and len(fits) > 1:
        fits = _narrowed(fits, shape, list(siblings))
    extra = len(shape) - len(per_layer)
    if extra == 0 and fits:
        return ()
    lead = tuple(range(max(extra, 0)))
    if stack_axis is not None and extra > 0:
        k = stack_axis + len(shape) if stack_axis < 0 else stack_axis
        want = lead if k == 0 else (k,)
        if (k != 0 and extra != 1) or want not in fits:
            raise ValueError(
                f"{what} has shape {shape}, one layer's is {per_layer}: `stack_axis={stack_axis}` "
                f"does not fit it (stack axes that do: {_placements(fits)}). Give the axis "
                "`nnx.vmap` stacked the layers along (its `out_axes`)."
            )
        return want
    if len(fits) == 1 and (fits[0] == lead or extra == 1):
        return fits[0]
    if not fits:
        raise ValueError(f"{what} has shape {shape}, expected (stack..., {per_layer})")
    if len(fits) == 1:
        raise ValueError(
            f"{what} has shape {shape}, one layer's is {per_layer}: stacked along axes "
            f"{fits[0]}; LoRA follows one stack axis, or several leading ones (nested `nnx.vmap` "
            "with the default `out_axes=0`)"
        )
    raise ValueError(
        f"{what} has shape {shape}, one layer's is {per_layer}: the layers may be stacked along "
        f"{_placements(fits)}, and `nnx.vmap` leaves no record of which (its `out_axes`). Pass "
        "`stack_axis=` to `jax_lora.wrap`: 0 for `nnx.vmap`'s default `out_axes=0`, else its "
        "`out_axes` (the factors are then stacked along the same axis, as if `nnx.vmap` had "
        "made them with the layer)."
    )


def _placements(fits: list[tuple[int, ...]]) -> str:
    if not fits:
        return "none"
    return " or ".join(f"axis {p[0]}" if len(p) == 1 else f"axes {p}" for p in fits)


def _stacked(
    geom: factors.Geometry,
    layer: nnx.Module,
    path: str,
    stack_axis: int | None = None,
    dora: bool = False,
) -> tuple[factors.Geometry, int | None]:
    """Layers made under ``nnx.vmap`` (run with ``nnx.scan``) hold kernels with extra (layer)
    axes; the factors get the same axes: ``a: (L, in..., r)``, ``b: (L, r, out...)`` for
    leading ones. Returns the geometry with the stack axes leading and, for a stack along a
    non-leading axis ``k``, ``k`` (as `wrap_nnx`'s ``stack_axis``; the kernel's own position is
    ``k % kernel.ndim``): the factors are stored with their stack axis there."""
    kernel = tuple(layer.kernel.shape)
    per_layer = geom.lead_shape + geom.in_shape + geom.out_shape
    pos = _stack_position(
        kernel, per_layer, stack_axis, f"the kernel at '{path}'", _bias_shapes(layer, geom)
    )
    value = layer.kernel.get_value()
    if quant.is_quantized(value) and pos and value.axis % len(kernel) in pos:
        from .quant_nnx import _check_not_across_stack

        _check_not_across_stack(f"{path}/kernel", kernel, pos[0], value.axis)
    lead = tuple(kernel[i] for i in pos)
    geom = dataclasses.replace(geom, lead_shape=lead + geom.lead_shape)
    if pos == tuple(range(len(pos))):
        return geom, None
    k = stack_axis if stack_axis is not None else pos[0]
    b_ndim = len(geom.lead_shape) + 1 + len(geom.out_shape)
    shapes = [("a", len(geom.a_shape) + 1), ("b", b_ndim)]
    if dora:  # DoRA's m: (lead..., out...), the stack among the lead axes
        shapes.append(("m", b_ndim - 1))
    for name, ndim in shapes:
        if not -ndim <= k < ndim:
            raise ValueError(
                f"the kernel at '{path}' has shape {kernel}, stacked along axis {pos[0]}: the "
                f"factor `{name}` ({ndim} axes with the stack) has no axis {k} to stack along. "
                "Give `stack_axis` counted from the end (nnx.vmap's `out_axes=-1`)."
            )
    return geom, k


def _factor_metadata(
    layer: nnx.Module, geom: factors.Geometry, kpos: int | None = None
) -> tuple[dict, dict]:
    """Partitioning for ``lora_a``/``lora_b`` inherited from the kernel's metadata, as in linen:
    ``a`` takes the (leading and) input-axis names, ``b`` the output-axis names; the rank axis is
    replicated. Empty when the kernel carries no names. For a kernel stacked along axis
    ``kpos``, the names are for the factors with their stack axis leading (see `_names_at`)."""
    meta = dict(layer.kernel.get_metadata())
    key = next((k for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)), None)
    names = meta.get(key) if key else None
    if names is None or len(names) != layer.kernel.ndim:
        return {}, {}
    if kpos is not None:
        names = (names[kpos], *names[:kpos], *names[kpos + 1 :])
    n = len(geom.lead_shape) + len(geom.in_shape)
    return {**meta, key: (*names[:n], None)}, {
        **meta,
        key: (*names[: len(geom.lead_shape)], None, *names[n:]),
    }


def _names_at(meta: dict | None, k: int) -> dict | None:
    """``meta`` with the first (stack) axis name of its partitioning moved to axis ``k``."""
    if meta is None:
        return None
    out = dict(meta)
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = out.get(key)
        if isinstance(names, tuple) and names:
            rest = list(names[1:])
            rest.insert(k if k >= 0 else len(names) + k, names[0])
            out[key] = tuple(rest)
    return out


def _lead_first(x: Any, kpos: int | None) -> Any:
    """``x`` with its stack axis ``kpos`` moved first (unchanged for ``None``)."""
    return x if kpos is None else jnp.moveaxis(x, kpos, 0)


def _stored(t: Any, k: int | None) -> Any:
    """A stack-first array as the layer stores it: its stack axis moved to ``k`` (the inverse
    of `_lead_first`; ``None`` stays ``None``)."""
    return t if k is None or t is None else jnp.moveaxis(t, 0, k)


def _stack_axis_of(layer: Any) -> int | None:
    """The axis a Linear/LinearGeneral/Einsum's factors are stacked along when it is not the
    leading one (`wrap_nnx(stack_axis=)`), else ``None``."""
    return None if _by_weight(layer) else getattr(layer, "lora_stack_axis", None)


def _factors_lead_first(layer: Any) -> tuple[jax.Array, jax.Array, jax.Array | None, int | None]:
    """``(a, b, m or None, kernel stack axis)`` of a Linear/LinearGeneral/Einsum with LoRA, the
    factors with their stack axis leading (`lora_state`'s layout) whatever `wrap_nnx` stored."""
    a, b = layer.lora_a[...], layer.lora_b[...]
    m = layer.lora_m[...] if hasattr(layer, "lora_m") else None
    k = getattr(layer, "lora_stack_axis", None)
    if k is None:
        return a, b, m, None
    a, b, m = (None if t is None else _lead_first(t, k) for t in (a, b, m))
    return a, b, m, k % layer.kernel.ndim


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
        drop = self.lora_dropout > 0 and not self.deterministic and self.lora_rngs is not None
        if drop:
            x = factors.dropout(x, self.lora_dropout, self.lora_rngs())
        if hasattr(self, "lora_m"):  # DoRA
            return _dora(self, y, x, drop, geom)
        return y + factors.branch(
            x, self.lora_a[...], self.lora_b[...], geom, self.lora_scale, self.precision
        )

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view(model, deterministic=...)`` reaches LoRA dropout (as ``nnx.Dropout``)."""
        if deterministic is not None:
            self.deterministic = deterministic


def _dora(layer: Any, y: jax.Array, x: jax.Array, drop: bool, geom: factors.Geometry):
    """DoRA's output of an adapted Linear/LinearGeneral/Einsum (see `jax_lora.dora.apply`)."""
    kernel = layer.kernel.get_value()  # QLoRA + DoRA: dequantized in `dora.apply_on`
    bias = layer.bias[...] if getattr(layer, "bias", None) is not None else None
    a, b, m = layer.lora_a[...], layer.lora_b[...], layer.lora_m[...]
    return dora.apply_on(y, bias, x, drop, kernel, a, b, m, geom, layer.lora_scale, layer.precision)


class LoraLinear(_LoraLayer, nnx.Linear):
    """``nnx.Linear`` + LoRA: ``y = x @ W + b + scale * dropout(x) @ a @ b`` with
    ``a: (in, r)``, ``b: (r, out)``. Made in place by `wrap_nnx`."""


class LoraLinearGeneral(_LoraLayer, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` + LoRA: ``a: (batch..., in..., r)``, ``b: (batch..., r, out...)``.
    Made in place by `wrap_nnx`."""


class LoraEinsum(_LoraLayer, nnx.Einsum):
    """``nnx.Einsum`` + LoRA, the kernel split into input and output axes by ``einsum_str``.
    Made in place by `wrap_nnx`."""


# ---------------------------------------------------------------------------------------------
# Any other layer: the base method traced, the branch added where each weight is contracted

_PROBE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "jax_lora_nnx_probe", default=None
)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _run(layer: Any, method: str, args: tuple, kwargs: dict) -> Any:
    """``base.<method>(layer, *args, **kwargs)`` with LoRA on the layer's adapted weights.

    The base method is traced with ``jax.make_jaxpr`` (the weights are closed-over constants,
    lifted to inputs by `weights.lift_consts`) and evaluated with the branch at each use. In
    probe mode (`wrap_nnx` reading roles off an example call) it records the uses instead."""
    if quant_nnx.is_quantized_layer(layer):  # QLoRA: this, on a dequantized copy
        return quant_nnx.lora_dequantized_call(layer, method, args, kwargs, _run)
    base = getattr(quant_nnx.plain_base(_BASES[type(layer)]), method)
    probe = _PROBE.get()
    probing = probe is not None and getattr(layer, "lora_probe", ())
    if not probing and (probe is not None or not (layer.lora_enabled and lora_enabled())):
        return base(layer, *args, **kwargs)
    geoms = dict(layer.lora_geoms) if not probing else {}
    names = list(layer.lora_probe) if probing else list(geoms)
    values = [getattr(layer, n).get_value() for n in names]
    flat, tree = jax.tree.flatten((args, kwargs))
    dyn = [_is_array(leaf) for leaf in flat]
    dyn_vals = [leaf for leaf, d in zip(flat, dyn, strict=True) if d]

    def fn(*vals: Any) -> Any:
        it = iter(vals)
        leaves = [next(it) if d else leaf for leaf, d in zip(flat, dyn, strict=True)]
        a, k = jax.tree.unflatten(tree, leaves)
        return base(layer, *a, **k)

    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*dyn_vals)
    closed, lifted, where = weights.lift_consts(closed, values)
    used = [(n, w) for n, w in zip(names, where, strict=True) if w is not None]
    uses = weights.analyse(closed, [w for _, w in used])
    if probing:
        for n, v in zip(names, values, strict=True):  # inside nnx.scan: one layer's slice
            probe[("shape", layer.lora_path, n)] = tuple(np.shape(v))
        for (n, _), u in zip(used, uses, strict=True):
            key = (layer.lora_path, n)
            old = probe.get(key, [])
            probe[key] = old if isinstance(old, str) else u if isinstance(u, str) else old + u
        return base(layer, *args, **kwargs)
    adapters = {}
    for (n, pos), u in zip(used, uses, strict=True):
        wpath = weight_path(layer.lora_path, n)
        problem = u if isinstance(u, str) else None
        geoms[n] = _unstacked(geoms[n], np.ndim(values[names.index(n)]))  # a scanned slice
        if problem is None:
            try:
                weights.check_uses(geoms[n], u)
            except weights.Unsupported as e:
                problem = str(e)
        if problem is not None:
            raise ValueError(
                f"LoRA cannot follow the weight '{wpath}' ({class_name(layer)}) in `{method}`: "
                f"{problem}; its adapter has roles {geoms[n].describe()}."
            )
        a, b = getattr(layer, f"{n}_lora_a")[...], getattr(layer, f"{n}_lora_b")[...]
        scale = dict(layer.lora_scale)[n]
        m = getattr(layer, f"{n}_lora_m", None)  # DoRA
        if m is not None:
            dora.check_uses(geoms[n], u, wpath)
            m = m[...]
        adapters[pos] = weights.Adapter(geoms[n], a, b, scale, _dropout_fn(layer), m)
    outs = weights.evaluate(closed, [*lifted, *dyn_vals], adapters)
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)


def _dropout_fn(layer: Any) -> Callable[[jax.Array], jax.Array] | None:
    """``x -> dropout(x)`` when the layer trains and has LoRA dropout (as `_LoraLayer`)."""
    if layer.lora_dropout > 0 and not layer.deterministic and layer.lora_rngs is not None:
        rate, stream = layer.lora_dropout, layer.lora_rngs
        return lambda x: factors.dropout(x, rate, stream())
    return None


class _LoraWeights(nnx.Module):
    """The LoRA ``__call__`` for any layer class (``class LoraX(_LoraWeights, X)``): the base
    method traced, ``scale * (x @ a) @ b`` added at each contraction of an adapted weight.

    `wrap_nnx` sets, per adapted weight ``w``: ``w_lora_a: (lead..., in..., r)`` and
    ``w_lora_b: (lead..., r, out...)`` (``nnx.LoRAParam``), with the axis groups in ``w``'s
    stored order; per layer: ``lora_geoms`` (``((name, weights.WeightGeometry), ...)``),
    ``lora_scale`` per weight (``((name, scale), ...)``: ``alpha_pattern`` may differ) and the
    other attributes of `_LoraLayer` but ``lora_a``/``lora_b``.
    """

    if TYPE_CHECKING:
        lora_geoms: tuple[tuple[str, weights.WeightGeometry], ...]
        lora_scale: tuple[tuple[str, float], ...]
        lora_dropout: float
        lora_rngs: nnx.RngStream | None
        lora_enabled: bool
        lora_path: str
        lora_injected: tuple[str, ...]
        deterministic: bool

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _run(self, "__call__", args, kwargs)

    def set_view(self, deterministic: bool | None = None) -> None:
        """``nnx.view(model, deterministic=...)`` reaches LoRA dropout (as ``nnx.Dropout``)."""
        if deterministic is not None:
            self.deterministic = deterministic


def _attend(self: Any, query: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    """``nnx.Embed.attend`` with LoRA: ``query @ (E + scale * a @ b).T``."""
    return _run(self, "attend", (query, *args), kwargs)


class LoraConv(_LoraWeights, nnx.Conv):
    """``nnx.Conv`` + LoRA on ``kernel (window..., in, out)``: ``kernel_lora_a: (window..., in,
    r)``, ``kernel_lora_b: (r, out)`` (a rank-``r`` convolution, then a 1x1 one). Made in place by
    `wrap_nnx`."""


class LoraEmbed(_LoraWeights, nnx.Embed):
    """``nnx.Embed`` + LoRA on ``embedding (vocab, d)``: ``embedding_lora_a: (vocab, r)`` (looked
    up by id), ``embedding_lora_b: (r, d)``; `attend` uses the same ``E + scale * a @ b``. Made in
    place by `wrap_nnx`."""

    attend = _attend


# base layer class -> its LoRA class, and back. Other classes (a user's subclass of a supported
# layer, or any layer adapted weight by weight) get a class made once per base by `lora_class`.
_CLASSES: dict[type, type] = {
    nnx.Linear: LoraLinear,
    nnx.LinearGeneral: LoraLinearGeneral,
    nnx.Einsum: LoraEinsum,
}
_WEIGHT_CLASSES: dict[type, type] = {nnx.Conv: LoraConv, nnx.Embed: LoraEmbed}
_BASES: dict[type, type] = {v: k for k, v in {**_CLASSES, **_WEIGHT_CLASSES}.items()}
_GENERATED = "_Lora["  # qualname prefix of made classes: _Lora[<module>:<qualname>], "." as "/"
_GENERATED_W = "_LoraW["  # the same for `_LoraWeights` classes


def lora_class(base: type, *, by_weight: bool | None = None) -> type:
    """The LoRA class for layer class ``base``: a module-level class for flax's layers, else
    one made (once per base, so jit caches stay valid) and pickled by name.

    ``by_weight`` (default: unless ``base`` is a Linear/LinearGeneral/Einsum) picks the
    weight-by-weight class (`_LoraWeights`) over the Dense-family one (`_LoraLayer`).

    A made class is ``jax_lora.nnx._Lora[<base module>:<base qualname>]`` (``_LoraW[...]`` for
    weight-by-weight classes; dots written as ``/``); this module's ``__getattr__`` rebuilds it
    from that name, so pickle, and anything that finds classes by module and qualname, works
    for any importable ``base``."""
    if by_weight is None:
        by_weight = not issubclass(base, SUPPORTED_NNX)
    table, prefix, mixin = (
        (_WEIGHT_CLASSES, _GENERATED_W, _LoraWeights)
        if by_weight
        else (_CLASSES, _GENERATED, _LoraLayer)
    )
    if base in table:
        return table[base]
    if base in _BASES:
        raise ValueError(f"{base.__name__} is already a LoRA class")
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"{prefix}{base.__module__}:{base.__qualname__}]".replace(".", "/"),
        "__doc__": f"{base.__name__} + LoRA (made by jax_lora.wrap).",
    }
    if "set_view" in dir(base):  # the base's own view switches stay; they set `deterministic`
        attrs["set_view"] = base.set_view
    if by_weight and issubclass(base, nnx.Embed):
        attrs["attend"] = _attend
    cls = type(f"Lora{base.__name__}", (mixin, base), attrs)
    table[base] = cls
    _BASES[cls] = base
    return cls


def __getattr__(name: str) -> type:
    """PEP 562: rebuild a class made by `lora_class` from its qualname (for pickle)."""
    for prefix, by_weight in ((_GENERATED_W, True), (_GENERATED, False)):
        if name.startswith(prefix) and name.endswith("]"):
            module_name, _, qualname = name[len(prefix) : -1].partition(":")
            base: Any = importlib.import_module(module_name.replace("/", "."))
            # a made class of a made class (LoRA on `quant_nnx.quant_class(...)`): one name
            parts = [qualname] if "[" in qualname else qualname.replace("/", ".").split(".")
            for part in parts:
                base = getattr(base, part)
            return lora_class(base, by_weight=by_weight)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_adapted(layer: Any) -> bool:
    return type(layer) in _BASES


def _by_weight(layer: Any) -> bool:
    return isinstance(layer, _LoraWeights)


def _owns_params(module: nnx.Module) -> bool:
    return any(isinstance(v, nnx.Param) for v in vars(module).values())


def _modules(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield path_str(path), node


def _weight_names(module: nnx.Module) -> list[str]:
    """The module's own ``nnx.Param`` attributes (not factors) with ndim >= 2."""
    return [
        n
        for n, v in vars(module).items()
        if isinstance(v, nnx.Param)
        and not isinstance(v, nnx.LoRAParam)
        and np.ndim(v.get_value()) >= 2
    ]


def _fixed_geometry(module: nnx.Module, name: str, path: str) -> weights.WeightGeometry | None:
    """Roles known from the class (no example call needed): nnx.Embed's ``embedding (vocab, d)``
    (``in`` = vocab, looked up), nnx.Conv's ``kernel (window..., in, out)``."""
    shape = tuple(np.shape(getattr(module, name).get_value()))
    if isinstance(module, nnx.Embed) and name == "embedding" and len(shape) == 2:
        return weights.WeightGeometry(shape, (), (0,), (1,))
    if isinstance(module, nnx.Conv) and name == "kernel":
        if module.feature_group_count != 1:
            raise ValueError(
                f"`targets` matches the weight '{weight_path(path, name)}' "
                f"({class_name(module)}) with feature_group_count={module.feature_group_count}: "
                "LoRA supports ungrouped convolutions only. Add "
                f"{re.escape(weight_path(path, name))!r} to `exclude`."
            )
        n = len(shape)
        return weights.WeightGeometry(shape, (), tuple(range(n - 1)), (n - 1,))
    return None


def _split_example(example: Any) -> tuple[tuple, dict]:
    """``(args...)`` or ``(args, kwargs)`` -> ``(args, kwargs)``."""
    if (
        isinstance(example, tuple)
        and len(example) == 2
        and isinstance(example[0], tuple)
        and isinstance(example[1], Mapping)
    ):
        return example[0], dict(example[1])
    if not isinstance(example, tuple):
        raise TypeError(
            f"`example` must be a tuple of positional arguments `(x,)` or `(args, kwargs)`, "
            f"got {type(example).__name__}"
        )
    return example, {}


def _probe(
    model: nnx.Module, layers: dict[str, tuple[nnx.Module, list[str]]], example: Any
) -> dict[tuple[str, str], list | str]:
    """Run ``model(*example)`` abstractly with ``layers`` ({path: (layer, weight names)}) in probe
    mode; returns the uses (or the reason it cannot be adapted) of each weight the call read."""
    args, kwargs = _split_example(example)
    found: dict[tuple[str, str], list | str] = {}
    saved = []
    try:
        for path, (layer, names) in layers.items():
            saved.append((layer, type(layer)))
            object.__setattr__(layer, "__class__", lora_class(type(layer), by_weight=True))
            layer.lora_probe = tuple(names)
            layer.lora_path = path
        token = _PROBE.set(found)
        try:
            nnx.eval_shape(lambda m: m(*args, **kwargs), model)
        finally:
            _PROBE.reset(token)
    finally:
        for layer, cls in saved:
            for name in ("lora_probe", "lora_path"):
                if name in vars(layer):
                    delattr(layer, name)
            object.__setattr__(layer, "__class__", cls)
    return found


def _weight_metadata(var: nnx.Variable, geom: weights.WeightGeometry) -> tuple[dict, dict]:
    """Partitioning for ``a``/``b`` from the weight's metadata (as `_factor_metadata`)."""
    meta = dict(var.get_metadata())
    key = next((k for k in ("out_sharding", "sharding_names", "sharding") if meta.get(k)), None)
    names = meta.get(key) if key else None
    if names is None or len(names) != len(geom.shape):
        return {}, {}
    a_names = (*(names[i] for i in geom.lead + geom.ins), None)
    b_names = (*(names[i] for i in geom.lead), None, *(names[i] for i in geom.outs))
    return {**meta, key: a_names}, {**meta, key: b_names}


def wrap_nnx(
    model: nnx.Module,
    config: LoraConfig,
    *,
    rngs: nnx.Rngs | None = None,
    example: tuple | None = None,
    stack_axis: int | None = None,
) -> nnx.Module:
    """Add LoRA to an initialised NNX model, in place; returns ``model``.

    Args:
      model: any ``nnx.Module``; layers are found by their ``/``-joined attribute path
        (``"blocks/0/attn/query"``), weights by ``<layer path>/<attribute>``
        (``"h/0/attn/c_attn/kernel"``).
      config: the `LoraConfig`.
      rngs: ``nnx.Rngs`` for the ``a`` init and for LoRA dropout (stream ``dropout``);
        default ``nnx.Rngs(0)``.
      example: ``(args...)`` or ``(args, kwargs)`` for one call ``model(*args, **kwargs)``,
        run abstractly (``nnx.eval_shape``, no compute) to read the axis roles of weights held
        by layers other than flax's Linear/LinearGeneral/Einsum/Conv/Embed.
      stack_axis: the axis along which ``nnx.vmap`` stacked layers (its ``out_axes``; ``0``
        also for nested leading stacks), for every stacked layer of the model. Default: read
        off the kernel's shape, and refused where it fits several axes (``D`` layers of a
        ``Linear(D, D)``: ``(D, D, D)``). A Linear/LinearGeneral/Einsum stacked along axis
        ``k`` gets its factors stacked along ``k`` too (``a: (in, L, r)``, ``b: (r, L, out)``
        for ``k = 1``), as if ``nnx.vmap`` had made them with the layer, so the model's own
        ``nnx.scan(in_axes=k)`` slices them per layer; ``lora_state`` still gives them (and
        takes them, ``load_lora``) stack-first. Its LoRA dropout stream (scalar keys per layer)
        stacks along axis 0: scan with ``nnx.StateAxes({nnx.RngState: 0, ...: k})``. Other
        layers' weights stack along leading axes only.

    The factors are ``nnx.LoRAParam``: ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
    ``nnx.DiffState(0, nnx.LoRAParam)`` select them. Flax's layers become `LoraLinear`,
    `LoraLinearGeneral`, `LoraEinsum`; a subclass of them gets a class made by `lora_class`.

    Any other layer whose own ``nnx.Param`` (ndim >= 2) is targeted (a pattern fully matches
    the weight path or the layer path) gets, per weight ``w``, ``w_lora_a: (lead..., in..., r)``
    and ``w_lora_b: (lead..., r, out...)``, and a class (`LoraConv`, `LoraEmbed`, or one made by
    `lora_class`) whose ``__call__`` (and ``attend`` for ``nnx.Embed``) adds the branch wherever
    the base method contracts ``w`` (matmul, einsum, conv, row lookup). Roles: ``nnx.Embed``'s
    ``embedding (vocab, d)`` is ``in`` = vocab, ``out`` = d; ``nnx.Conv``'s ``kernel
    (window..., in, out)`` is ``in`` = all but the last axis (grouped convolutions are refused);
    any other layer's roles come from its use in the ``example`` call, which is then required.
    ``lora_state`` puts these factors at the weight path (``{"emb": {"embedding": {"a", "b"}}}``).

    ``targets=None`` ("all-linear") adapts flax's Linear/LinearGeneral/Einsum, and, only when
    ``example`` is given, other layers' weights used as matmul/einsum operands; never
    ``nnx.Conv``/``nnx.Embed`` (name them in ``targets``). Weights it cannot adapt are skipped
    with a warning.

    LoRA dropout runs exactly when the model runs in training mode: each adapted layer's
    ``deterministic`` attribute, set by ``model.train()`` / ``model.eval()``,
    ``set_attributes(deterministic=...)``, ``nnx.with_attributes`` and ``nnx.view``. At wrap
    time a layer takes the model's current mode: its own ``deterministic`` if it has one, else
    that of the module (an ``nnx.Dropout``, say) whose path shares the longest prefix with the
    layer's (the first such in graph order on a tie), else training (``False``, as a new
    ``nnx.Dropout``). Each layer draws its masks from its own ``nnx.RngStream``, forked from
    ``rngs.dropout`` (split along the stack axes for a stacked layer), so masks differ between
    layers and do not depend on which other layers ran. (Row lookups get no dropout, as PEFT.)

    >>> import jax.numpy as jnp, jax_lora
    >>> from flax import nnx
    >>> model = jax_lora.wrap(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), jax_lora.LoraConfig(rank=4))
    >>> model.lora_a.shape, model.lora_b.shape, type(model).__name__
    ((8, 4), (4, 16), 'LoraLinear')
    >>> emb = nnx.Embed(100, 8, rngs=nnx.Rngs(0))
    >>> emb = jax_lora.wrap(emb, jax_lora.LoraConfig(rank=2, targets=["embedding"]))
    >>> emb.embedding_lora_a.shape, emb.embedding_lora_b.shape, emb(jnp.array([3, 7])).shape
    ((100, 2), (2, 8), (2, 8))
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected an nnx.Module, got {type(model).__name__}")
    if stack_axis is not None and (
        isinstance(stack_axis, bool) or not isinstance(stack_axis, (int, np.integer))
    ):
        raise TypeError(
            f"`stack_axis` must be an int (the `out_axes` of the `nnx.vmap` that stacked the "
            f"layers) or None, got {stack_axis!r}"
        )
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    candidates, targets = [], []
    generic: dict[str, tuple[nnx.Module, dict[str, weights.WeightGeometry]]] = {}
    to_probe: dict[str, tuple[nnx.Module, list[str]]] = {}
    skipped: list[tuple[str, str]] = []
    for path, module in _modules(model):
        if isinstance(module, SUPPORTED_NNX):
            candidates.append((path, type(module).__name__))
            if is_target(config, path):
                if is_adapted(module):
                    raise ValueError(
                        f"the layer at '{path}' already has LoRA factors; unwrap or merge first"
                    )
                targets.append((path, module))
            continue
        names = [n for n in _weight_names(module) if weight_targeted(config, path, n)]
        if config.targets is None and (
            example is None or isinstance(module, (nnx.Conv, nnx.Embed))
        ):
            names = []  # all-linear: custom weights need `example`; conv/lookup must be named
        if not names:
            if explicitly_targeted(config, path) and _owns_params(module):
                raise unsupported_error(path, type(module).__name__)
            continue
        if is_adapted(module):
            raise ValueError(
                f"the layer at '{path}' already has LoRA factors; unwrap or merge first"
            )
        for n in names:
            geom = _fixed_geometry(module, n, path)
            if geom is not None:
                generic.setdefault(path, (module, {}))[1][n] = geom
            elif example is None:
                raise ValueError(
                    f"`targets` matches the weight '{weight_path(path, n)}' of "
                    f"{class_name(module)}, whose axis roles (input vs output) LoRA reads off a "
                    "call: pass `example=(x,)` (or `example=(args, kwargs)`) with an input "
                    "for the model to `jax_lora.wrap`."
                )
            else:
                to_probe.setdefault(path, (module, []))[1].append(n)
    stacks: dict[str, set[tuple[int, ...]]] = {}  # path -> stack axes of its probed weights
    if to_probe:
        found = _probe(model, to_probe, example)
        for path, (module, names) in to_probe.items():
            for n in names:
                wpath = weight_path(path, n)
                uses = found.get((path, n), [])
                shape = tuple(np.shape(getattr(module, n).get_value()))
                seen = found.get(("shape", path, n), shape)
                stack = shape[: len(shape) - len(seen)]
                fits = _stack_fits(shape, tuple(seen))
                lead = tuple(range(len(stack)))  # custom weights follow leading stacks only
                if stack + tuple(seen) != shape or (
                    stack
                    and (stack_axis not in (None, 0) or (stack_axis is None and fits != [lead]))
                ):
                    if stack_axis is None and len(fits) > 1:  # the ambiguity error
                        _stack_position(shape, tuple(seen), None, f"the weight '{wpath}'")
                    raise ValueError(
                        f"the weight '{wpath}' has shape {shape} but its layer's call used it "
                        f"as {seen} (stack axes that fit: {_placements(fits)}): LoRA follows "
                        f"the stacks of {class_name(module)} along leading axes only "
                        "(`nnx.vmap` + `nnx.scan` with the default axis 0; `stack_axis=0`)"
                    )
                geom, why = weights.decide(
                    config.for_path(wpath), wpath, class_name(module), tuple(seen), uses
                )
                if geom is None:
                    if why is not None:
                        skipped.append((wpath, why))
                    continue
                generic.setdefault(path, (module, {}))[1][n] = _stacked_weight(geom, stack)
                stacks.setdefault(path, set()).add(stack)
    for path, (module, geoms) in generic.items():
        for n in geoms:
            candidates += [(weight_path(path, n), class_name(module)), (path, class_name(module))]
    try:
        check_all_matched(config, list(dict.fromkeys(candidates)))
    except ValueError as e:
        if not skipped:
            raise
        why = "\n".join(f"  {p}: {w}" for p, w in skipped[:20])
        raise ValueError(f"{e}\nWeights seen but not adaptable:\n{why}") from None
    if skipped and config.targets is None:
        listing = "; ".join(f"{p} ({w})" for p, w in skipped[:20])
        warnings.warn(
            f"jax_lora: targets=None skipped {len(skipped)} weight(s) LoRA cannot adapt as "
            f"linear layers: {listing}",
            stacklevel=3,
        )
    # Everything is checked before the model changes: a refused wrap leaves it as it was.
    plans = []
    for path, layer in targets:
        geom, k = _stacked(_init_geometry(layer, path), layer, path, stack_axis, config.use_dora)
        factors.check_rank(geom, config.rank_for(path), path)
        plans.append((path, layer, geom, k))
    wplans = []
    for path, (layer, geoms) in generic.items():
        fgs = {n: _flat_geometry(g) for n, g in geoms.items()}
        for n, fg in fgs.items():
            factors.check_rank(fg, config.rank_for(weight_path(path, n)), weight_path(path, n))
        wplans.append((path, layer, geoms, fgs))
    config.check_patterns(
        [p for p, *_ in plans] + [weight_path(p, n) for p, _, g, _ in wplans for n in g]
    )
    modes = [
        (path.split("/") if path else [], m.deterministic)
        for path, m in _modules(model)
        if isinstance(getattr(m, "deterministic", None), bool)
    ]
    for path, layer, geom, k in plans:
        kpos = None if k is None else k % layer.kernel.ndim  # the stack axis in the kernel
        meta_a, meta_b = _factor_metadata(layer, geom, kpos)
        cfg = config.for_path(path)  # this layer's rank and alpha (rank_pattern, ...)
        a, b = factors.init_a(rngs.params(), geom, cfg), factors.init_b(geom, cfg)
        stack = geom.lead_shape[
            : len(geom.lead_shape) - len(_init_geometry(layer, path).lead_shape)
        ]
        injected = ["lora_a", "lora_b", *_common(layer, path, config, rngs, modes, stack)]
        layer.lora_scale = cfg.scale
        m = meta_m = None
        if config.use_dora:  # DoRA's magnitude m: (lead..., out...), PEFT's init ‖W + s·a@b‖
            kernel = quant.dequantize(layer.kernel.get_value())
            m = dora.init_magnitude(_lead_first(kernel, kpos), a, b, cfg.scale)
            nl = len(geom.lead_shape)  # partitioned as b without its rank axis
            meta_m = {
                key: v[:nl] + v[nl + 1 :] if isinstance(v, tuple) and len(v) == m.ndim + 1 else v
                for key, v in meta_b.items()
            }
        if k is not None:  # stored as `nnx.vmap(out_axes=k)` would have made them
            a, b, m = (_stored(t, k) for t in (a, b, m))
            meta_a, meta_b, meta_m = (_names_at(t, k) for t in (meta_a, meta_b, meta_m))
            layer.lora_stack_axis = k
            injected.append("lora_stack_axis")
        layer.lora_a = nnx.LoRAParam(a, **meta_a)
        layer.lora_b = nnx.LoRAParam(b, **meta_b)
        if m is not None:
            layer.lora_m = nnx.LoRAParam(m.astype(config.param_dtype), **meta_m)
            injected.append("lora_m")
        layer.lora_injected = tuple(injected)
        object.__setattr__(layer, "__class__", lora_class(type(layer)))
    for path, layer, geoms, fgs in wplans:
        injected = []
        for n, geom in geoms.items():
            meta_a, meta_b = _weight_metadata(getattr(layer, n), geom)
            if isinstance(layer, nnx.Embed):  # LoRA+ groups its factors as PEFT's Embedding
                meta_a, meta_b = ({**m, EMBEDDING_MARK: True} for m in (meta_a, meta_b))
            cfg = config.for_path(weight_path(path, n))
            a = factors.init_a(rngs.params(), fgs[n], cfg)
            setattr(layer, f"{n}_lora_a", nnx.LoRAParam(a, **meta_a))
            setattr(layer, f"{n}_lora_b", nnx.LoRAParam(factors.init_b(fgs[n], cfg), **meta_b))
            injected += [f"{n}_lora_a", f"{n}_lora_b"]
            if config.use_dora:  # m: (lead..., out...) = ‖W‖ over the in axes (PEFT's init)
                injected.append(_weight_magnitude(layer, n, geom, cfg, meta_b))
        layer.lora_geoms = tuple(geoms.items())
        stack = stacks.get(path, {()})  # nnx.vmap stacks: one dropout stream per layer
        stack = stack.pop() if len(stack) == 1 else ()
        injected += ["lora_geoms", *_common(layer, path, config, rngs, modes, stack)]
        layer.lora_scale = tuple((n, config.scale_for(weight_path(path, n))) for n in geoms)
        layer.lora_injected = tuple(injected)
        object.__setattr__(layer, "__class__", lora_class(type(layer), by_weight=True))
    return model


def _weight_magnitude(layer, n: str, geom: weights.WeightGeometry, cfg, meta_b: dict) -> str:
    """Set DoRA's ``<n>_lora_m: (lead..., out...)`` of weight ``n``; returns its name."""
    w, a, b = (
        quant.dequantize(getattr(layer, n).get_value()),  # QLoRA + DoRA: ‖dequantized W‖
        getattr(layer, f"{n}_lora_a")[...],
        getattr(layer, f"{n}_lora_b")[...],
    )
    m = dora.weight_norm_stored(w, a, b, cfg.scale, geom).astype(cfg.param_dtype)
    nl = len(geom.lead)  # partitioned as b without its rank axis
    meta_m = {
        k: v[:nl] + v[nl + 1 :] if isinstance(v, tuple) and len(v) == m.ndim + 1 else v
        for k, v in meta_b.items()
    }
    setattr(layer, f"{n}_lora_m", nnx.LoRAParam(m, **meta_m))
    return f"{n}_lora_m"


def _stacked_weight(g: weights.WeightGeometry, stack: tuple[int, ...]) -> weights.WeightGeometry:
    """Roles ``g`` of one layer's weight, for the weight of ``nnx.vmap``-stacked layers
    ``(stack..., per-layer...)``: the stack axes lead (the factors get them too)."""
    k = len(stack)
    shift = lambda idx: tuple(i + k for i in idx)  # noqa: E731
    return weights.WeightGeometry(
        (*stack, *g.shape), (*range(k), *shift(g.lead)), shift(g.ins), shift(g.outs)
    )


def _unstacked(g: weights.WeightGeometry, ndim: int) -> weights.WeightGeometry:
    """`_stacked_weight` undone for a call that sees one layer's ``ndim``-axis slice (inside
    ``nnx.scan``); ``g`` as it is when the call sees the whole weight."""
    k = len(g.shape) - ndim
    if k <= 0 or g.lead[:k] != tuple(range(k)):
        return g
    shift = lambda idx: tuple(i - k for i in idx)  # noqa: E731
    return weights.WeightGeometry(g.shape[k:], shift(g.lead[k:]), shift(g.ins), shift(g.outs))


def _flat_geometry(g: weights.WeightGeometry) -> factors.Geometry:
    """The factor shapes of a weight with roles ``g``, for `factors.init_a`/`init_b`."""
    return factors.Geometry(
        kind="generic",
        lead_shape=tuple(g.shape[i] for i in g.lead),
        in_shape=tuple(g.shape[i] for i in g.ins),
        out_shape=tuple(g.shape[i] for i in g.outs),
    )


def _common(layer, path: str, config: LoraConfig, rngs, modes, stack) -> list[str]:
    """Set the per-layer LoRA attributes both kinds of layer share; returns their names."""
    layer.lora_scale = config.scale
    layer.lora_dropout = config.dropout
    layer.lora_rngs = (
        (rngs.dropout.split(stack) if stack else rngs.dropout.fork())
        if config.dropout > 0
        else None
    )
    layer.lora_enabled = True
    layer.lora_path = path
    names = ["lora_scale", "lora_dropout", "lora_rngs", "lora_enabled", "lora_path"]
    names.append("lora_injected")
    if not hasattr(layer, "deterministic"):
        layer.deterministic = _current_mode(modes, path)
        names.append("deterministic")
    return names


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


def _factor_slots(layer: nnx.Module, path: str) -> list[tuple[str, str, str]]:
    """``[(lora-tree path, a attribute, b attribute)]`` of an adapted layer: the layer path for
    Linear/LinearGeneral/Einsum, the weight path for the others (as linen)."""
    if _by_weight(layer):
        return [(weight_path(path, n), f"{n}_lora_a", f"{n}_lora_b") for n, _ in layer.lora_geoms]
    return [(path, "lora_a", "lora_b")]


def lora_state(model: nnx.Module) -> dict[str, Any]:
    """The factors as the linen-style ``lora`` tree ``{path...: {"a", "b"}}`` (arrays), ready for
    `AdapterCheckpointer.save` and `export_peft`: at the layer path for Linear/LinearGeneral/
    Einsum, at the weight path for other layers (``{"emb": {"embedding": {"a", "b"}}}``)."""
    out: dict[str, Any] = {}
    for path, layer in adapted_layers(model):
        k = _stack_axis_of(layer)  # a stack along a non-leading axis: stored there
        for where, a, b in _factor_slots(layer, path):
            node = out
            for part in where.split("/") if where else []:
                node = node.setdefault(part, {})
            node.update(a=_lead_first(getattr(layer, a)[...], k))
            node.update(b=_lead_first(getattr(layer, b)[...], k))
            m_name = a[: -len("a")] + "m"  # lora_m / <weight>_lora_m (DoRA)
            if hasattr(layer, m_name):
                node[dora.MAGNITUDE] = _lead_first(getattr(layer, m_name)[...], k)
    return out


def load_lora(model: nnx.Module, lora: Mapping[str, Any]) -> None:
    """Set the factors of an adapted ``model`` from a ``lora`` tree (as `lora_state` gives, or
    restored from a checkpoint / imported from PEFT); every layer and shape must match."""

    check_same_layout(lora, lora_state(model), "`lora` tree")
    flat = {path_str(p): n for p, n in factors.factor_nodes(lora)}
    for path, layer in adapted_layers(model):
        k = _stack_axis_of(layer)
        for where, a, b in _factor_slots(layer, path):
            va, vb = getattr(layer, a), getattr(layer, b)
            va[...] = _stored(jnp.asarray(flat[where]["a"], va[...].dtype), k)
            vb[...] = _stored(jnp.asarray(flat[where]["b"], vb[...].dtype), k)
            m_name = a[: -len("a")] + "m"  # lora_m / <weight>_lora_m (DoRA)
            if hasattr(layer, m_name):
                vm = getattr(layer, m_name)
                vm[...] = _stored(jnp.asarray(flat[where]["m"], vm[...].dtype), k)


def _fold(model: nnx.Module, sign: float, source: nnx.Module | None = None) -> nnx.Module:
    out = quant_nnx.dequantize_nnx(nnx.clone(model))  # QLoRA: merged into a plain dense model
    src = dict(adapted_layers(source if source is not None else out))
    for path, layer in _modules(out):
        if path not in src:
            continue
        f = src[path]
        if _by_weight(f):
            for n, geom in f.lora_geoms:
                w = getattr(layer, n)
                if hasattr(f, f"{n}_lora_m"):  # DoRA (unmerging: the adapted model's norm)
                    w[...] = _fold_dora(w[...], f, n, geom, sign)
                    continue
                d = weights.delta(
                    geom,
                    getattr(f, f"{n}_lora_a")[...],
                    getattr(f, f"{n}_lora_b")[...],
                    sign * dict(f.lora_scale)[n],
                )
                w[...] = (w[...].astype(d.dtype) + d).astype(w[...].dtype)
        else:  # factors and kernel with the stack axis leading (`_factors_lead_first`)
            a, b, m, kpos = _factors_lead_first(f)
            w, s = _lead_first(layer.kernel[...], kpos), f.lora_scale
            if m is None:
                w = factors.fold(w, a, b, sign * s)
            elif sign > 0:  # DoRA; unmerging needs the norm of the adapted model's kernel
                w = dora.merge_kernel(w, a, b, m, s)
            else:
                norm = dora.weight_norm(_lead_first(f.kernel[...], kpos), a, b, s)
                w = dora.unmerge_kernel(w, a, b, m, norm, s)
            layer.kernel[...] = _stored(w, kpos)
        if is_adapted(layer):
            for name in layer.lora_injected:
                delattr(layer, name)
            object.__setattr__(layer, "__class__", _BASES[type(layer)])
    return out


def _fold_dora(w: jax.Array, f: Any, n: str, geom: weights.WeightGeometry, sign: float):
    """Weight ``n`` merged with (``sign > 0``) or unmerged from DoRA's factors of layer ``f``."""
    a, b, m = (getattr(f, f"{n}_lora_{k}")[...] for k in ("a", "b", "m"))
    s = dict(f.lora_scale)[n]
    if sign > 0:
        return dora.merge_stored(w, a, b, m, s, geom)
    norm = dora.weight_norm_stored(getattr(f, n)[...], a, b, s, geom)
    std = jnp.transpose(w, geom.lead + geom.ins + geom.outs)
    return geom.to_stored(dora.unmerge_kernel(std, a, b, m, norm, s))


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
