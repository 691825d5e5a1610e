"""QLoRA for Flax NNX: `quantize_nnx` stores a model's frozen kernels as `quant.QArray`s, in place.

Each quantized layer keeps its object and its ``nnx.Param`` (whose value becomes the `QArray`,
metadata kept) and switches to a subclass (`QuantLinear`, ..., or one made by `quant_class`)
whose ``__call__`` runs the base class's on the dequantized kernels, under `quant._recomputed`:
the backward pass dequantizes again instead of keeping a full-precision kernel alive. A layer
that is (or later gets) LoRA factors runs the LoRA branch outside, on the same inputs.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from . import quant
from .targets import path_str


def _modules(model: nnx.Module):
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module):
            yield path_str(path), node


def _own_params(module: nnx.Module) -> list[tuple[str, nnx.Param]]:
    """The module's own ``nnx.Param`` attributes that are not LoRA factors."""
    return [
        (n, v)
        for n, v in vars(module).items()
        if isinstance(v, nnx.Param) and not isinstance(v, nnx.LoRAParam)
    ]


def is_quantized_layer(module: Any) -> bool:
    """Whether ``module`` holds a `QArray` in one of its own ``nnx.Param``s."""
    return any(quant.is_quantized(v.get_value()) for _, v in _own_params(module))


def _numeric(x: Any) -> bool:
    return quant._array_leaf(x) and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended)


def dequantized_call(layer: nnx.Module, method: str, args: tuple, kwargs: dict) -> Any:
    """The base class's ``method`` (the next one after `_QuantLayer` in ``type(layer)``'s MRO)
    run on a copy of ``layer`` whose `QArray`s are dequantized, as a function of the layer's
    arrays and the call's arguments, recomputed in the backward pass (`quant._recomputed`).

    The copy is ``nnx.merge`` of the layer's pure state: state the base method changes (none for
    flax's layers) is not written back. The `QArray`s get no gradient, the layer's float params
    (a bias) theirs (as linen)."""
    _check_factor_dtypes(layer)
    graphdef, state = nnx.split(layer)

    def run(zero, tree):
        p, a, k = tree
        p = quant.dequantize(quant.frozen_codes(p, zero))
        copy = nnx.merge(graphdef, p)
        return getattr(super(_QuantLayer, copy), method)(*a, **k)

    pure = nnx.to_pure_dict(state)
    return quant.recomputed_apply(run, (pure, args, kwargs), (args, kwargs), dynamic=_numeric)


def lora_dequantized_call(
    layer: nnx.Module, method: str, args: tuple, kwargs: dict, run: Callable[..., Any]
) -> Any:
    """``run(copy, method, args, kwargs)`` (`jax_lora.nnx._run`: the base method with the LoRA
    branch at each use of an adapted weight) on a copy of a weight-by-weight adapted ``layer``
    whose `QArray`s are dequantized, recomputed in the backward pass (`quant._recomputed`): the
    adapter sees exactly the float weight's roles, the base the dequantized weight, and no
    full-precision weight is kept for the backward pass.

    The `QArray`s get no gradient (``stop_gradient``), the factors and float params theirs. The
    copy's LoRA dropout draws from a key taken from the layer's own stream (advanced here), so
    masks differ between calls though the copy's state is not written back."""
    _check_factor_dtypes(layer)
    graphdef, lo, rest = nnx.split(layer, nnx.LoRAParam, ...)
    lo, rest = nnx.to_pure_dict(lo), nnx.to_pure_dict(rest)
    stream = getattr(layer, "lora_rngs", None)
    drop = (  # as `jax_lora.nnx._dropout_fn` (a layer being probed by `wrap` has no stream)
        stream is not None and getattr(layer, "lora_dropout", 0) > 0 and not layer.deterministic
    )
    key = stream() if drop else None
    impl = jax.random.key_impl(key) if drop else None
    key_data = jax.random.key_data(key) if drop else None

    def f(zero, tree):
        lo, rest, kd, a, k = tree
        rest = quant.dequantize(quant.frozen_codes(rest, zero))
        copy = nnx.merge(graphdef, lo, rest)
        if kd is not None:
            copy.lora_rngs = nnx.RngStream(jax.random.wrap_key_data(kd, impl=impl), tag=stream.tag)
        return run(copy, method, a, k)

    tree = (lo, rest, key_data, args, kwargs)
    return quant.recomputed_apply(f, tree, (args, kwargs), dynamic=_numeric)


def _check_factor_dtypes(layer: nnx.Module) -> None:
    """As linen (`quant._check_factor_dtypes`): LoRA factors narrower than the quantized base's
    compute dtype lose the update's bits."""
    qs = [v.get_value() for _, v in _own_params(layer) if quant.is_quantized(v.get_value())]
    path = getattr(layer, "lora_path", type(layer).__name__)
    for name, f in vars(layer).items():
        if isinstance(f, nnx.LoRAParam):
            quant._check_factor_dtype(f"{path}/{name}", f.get_value(), qs)


def _check_not_across_stack(where: str, shape: tuple[int, ...], k: int, axis: int) -> None:
    """Quantization blocks along the stack axis ``k`` of a kernel stacked along a non-leading
    axis would span layers (and the model's ``nnx.scan`` could not slice them): refused, naming
    the per-layer contraction axis in the stored kernel's coordinates."""
    n, kpos = len(shape), k % len(shape)
    if not -n <= axis < n or axis % n != kpos:
        return
    inner = n - 3 if n - 3 < kpos else n - 2  # the per-layer axis -2, stack axis at kpos
    raise ValueError(
        f"'{where}' of shape {shape} is a stack of layers along axis {kpos}: quantizing along "
        f"`axis={axis}` would run its blocks across the layers. Give the contraction axis of "
        f"the stored kernel, e.g. `axis={inner}` (each layer's input axis)"
    )


def plain_base(cls: type) -> type:
    """The layer class ``cls`` runs on float weights: its base for a quantized-base class."""
    return _QBASES.get(cls, cls)


class _QuantLayer(nnx.Module):
    """The ``__call__`` in front of a base layer class (``class QuantX(_QuantLayer, X)``): the
    base's, on the dequantized kernels (`dequantized_call`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return dequantized_call(self, "__call__", args, kwargs)


def _attend(self: Any, *args: Any, **kwargs: Any) -> Any:
    return dequantized_call(self, "attend", args, kwargs)


class QuantLinear(_QuantLayer, nnx.Linear):
    """``nnx.Linear`` with a quantized ``kernel`` (a `QArray`). Made in place by `quantize`."""


class QuantLinearGeneral(_QuantLayer, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` with a quantized ``kernel``. Made in place by `quantize`."""


class QuantEinsum(_QuantLayer, nnx.Einsum):
    """``nnx.Einsum`` with a quantized ``kernel``. Made in place by `quantize`."""


class QuantConv(_QuantLayer, nnx.Conv):
    """``nnx.Conv`` with a quantized ``kernel (window..., in, out)``. Made by `quantize`."""


def _lookup(self: Any, inputs: Any, out_sharding: Any = None) -> Any:
    """A quantized ``nnx.Embed``'s lookup, dequantizing only the rows taken
    (`quant.take_dequantized`): bit-identical to ``nnx.Embed.__call__`` on the dequantized
    table. The whole table (`dequantized_call`) where it cannot be gathered so (blocks along
    the rows, double quantization, one row), with ``out_sharding`` or LoRA factors of its own."""
    own_lora = any(isinstance(v, nnx.LoRAParam) for v in vars(self).values())
    rows = None
    if out_sharding is None and not own_lora:
        rows = quant.embed_rows(self.embedding.get_value(), inputs, self.num_embeddings)
    if rows is None:
        kw = {} if out_sharding is None else {"out_sharding": out_sharding}
        return dequantized_call(self, "__call__", (inputs,), kw)
    (rows,) = self.promote_dtype((rows,), dtype=self.dtype, inexact=False)
    return rows


class QuantEmbed(_QuantLayer, nnx.Embed):
    """``nnx.Embed`` with a quantized ``embedding`` (``__call__`` and ``attend``)."""

    __call__ = _lookup
    attend = _attend


_QCLASSES: dict[type, type] = {
    nnx.Linear: QuantLinear,
    nnx.LinearGeneral: QuantLinearGeneral,
    nnx.Einsum: QuantEinsum,
    nnx.Conv: QuantConv,
    nnx.Embed: QuantEmbed,
}
_QBASES: dict[type, type] = {v: k for k, v in _QCLASSES.items()}
_GENERATED = "_Quant["


def quant_class(base: type) -> type:
    """The quantized-base class for layer class ``base``: module-level for flax's layers, else
    made once per base as ``jax_lora.quant_nnx._Quant[<module>:<qualname>]`` (rebuilt from that
    name by this module's ``__getattr__``, so pickle works)."""
    if base in _QCLASSES:
        return _QCLASSES[base]
    if base in _QBASES:
        raise ValueError(f"{base.__name__} is already a quantized-base class")
    attrs: dict[str, Any] = {
        "__module__": __name__,
        "__qualname__": f"{_GENERATED}{base.__module__}:{base.__qualname__}]".replace(".", "/"),
        "__doc__": f"{base.__name__} with quantized weights (made by jax_lora.quantize).",
    }
    if issubclass(base, nnx.Embed):
        attrs["attend"] = _attend
    cls = type(f"Quant{base.__name__}", (_QuantLayer, base), attrs)
    _QCLASSES[base] = cls
    _QBASES[cls] = base
    return cls


def __getattr__(name: str) -> type:
    """PEP 562: rebuild a class made by `quant_class` from its qualname (for pickle)."""
    if name.startswith(_GENERATED) and name.endswith("]"):
        module_name, _, qualname = name[len(_GENERATED) : -1].replace("/", ".").partition(":")
        base: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            base = getattr(base, part)
        return quant_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _plain_class(cls: type) -> type:
    """``cls`` without its quantized-base layer (LoRA kept): the class after dequantizing."""
    from .nnx import _BASES, _LoraWeights, lora_class

    if cls in _QBASES:
        return _QBASES[cls]
    base = _BASES.get(cls)
    if base in _QBASES:
        return lora_class(_QBASES[base], by_weight=issubclass(cls, _LoraWeights))
    return cls


def _quantized_class(cls: type) -> type:
    """``cls`` with the quantized-base layer: ``QuantX`` for ``X``, the LoRA class of
    ``QuantX`` for an adapted ``X`` (the same class as wrapping a quantized ``X``)."""
    from .nnx import _BASES, _LoraWeights, lora_class

    if cls in _QBASES:
        return cls
    base = _BASES.get(cls)
    if base is None:
        return quant_class(cls)
    if base in _QBASES:
        return cls
    return lora_class(quant_class(base), by_weight=issubclass(cls, _LoraWeights))


def quantize_nnx(
    model: nnx.Module,
    qtype: str,
    *,
    targets: str | Sequence[str] | None = None,
    block: int | None = None,
    axis: int = -2,
    double_quant: bool = False,
    dtype: Any = None,
) -> nnx.Module:
    """`quant.quantize` for an NNX model, in place: each targeted ``nnx.Param`` (the path
    ``<layer path>/<attribute>``, or the layer path itself for its 2+-axis weights, as
    `quant.quantize`; default: every ``kernel`` with 2+ axes) holds a `QArray`
    (its metadata, e.g. sharding names, kept) and its layer becomes a `_QuantLayer` subclass.

    Works before or after `jax_lora.wrap`, a layer gets the same class either way; a weight with
    LoRA factors (Linear/LinearGeneral/Einsum, or ``nnx.Conv``/``nnx.Embed``/custom weights
    adapted weight by weight, `lora_dequantized_call`) keeps them; a DoRA magnitude still at its
    init is re-measured on the dequantized weight (`_fresh_magnitude`), so the order does not
    matter for a fresh adapter (PEFT's is quantize, then wrap). Everything is checked and
    quantized before the model changes: a refused call leaves it as it was. Returns ``model``."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"expected an nnx.Module, got {type(model).__name__}")
    pats = None if targets is None else [targets] if isinstance(targets, str) else list(targets)
    done = [
        f"{p}/{n}" if p else n
        for p, m in _modules(model)
        for n, v in _own_params(m)
        if quant.is_quantized(v.get_value())
    ]
    if done:
        raise ValueError(
            f"the model is already quantized (e.g. '{done[0]}'); quantize the float model once, "
            "or `jax_lora.merge` it back to a plain one first"
        )
    plans, seen = [], []
    for path, module in _modules(model):
        for name, var in _own_params(module):
            wpath = f"{path}/{name}" if path else name
            value = var.get_value()
            seen.append(wpath)
            if not quant._target_hit(pats, wpath, value):
                continue
            k = getattr(module, "lora_stack_axis", None) if name == "kernel" else None
            if k is not None:  # a stack along a non-leading axis (`wrap_nnx(stack_axis=)`)
                _check_not_across_stack(wpath, tuple(np.shape(value)), k, axis)
            q = quant.quantize_array(
                value, qtype, block=block, axis=axis, double_quant=double_quant, dtype=dtype,
                path=wpath,
            )  # fmt: skip
            plans.append((module, var, q))
    if not plans:
        what = "no nnx.Param named 'kernel' with 2+ axes" if pats is None else f"`targets` {pats}"
        raise ValueError(
            f"nothing to quantize: {what} matches no weight of the model (weights: {seen[:20]}); "
            "give a weight path ('conv/kernel') or a module path ('conv')"
        )
    fresh = [_fresh_magnitude(module, var, q) for module, var, q in plans]
    for (module, var, q), m in zip(plans, fresh, strict=True):
        var.set_value(q)
        if m is not None:
            m[0].set_value(m[1])
        object.__setattr__(module, "__class__", _quantized_class(type(module)))
    return model


def _fresh_magnitude(module: nnx.Module, var: nnx.Param, q: quant.QArray) -> Any:
    """``(m Variable, new m)`` when ``var`` is a DoRA-adapted weight whose magnitude is still
    PEFT's init for the float weight, ``‖W + s·a@b‖`` (to 4 ulp of ``m``'s dtype): the same
    init for the dequantized weight, as quantizing first then wrapping (PEFT's order) makes it,
    so a fresh adapter keeps the quantized model's outputs. A trained ``m`` is the adapter's:
    kept (its direction is then the quantized weight's). ``None`` otherwise."""
    from . import dora
    from .nnx import _by_weight, _factors_lead_first, _lead_first, _stored, is_adapted

    if not is_adapted(module):
        return None
    name = next(n for n, v in vars(module).items() if v is var)
    if _by_weight(module):
        geoms = dict(module.lora_geoms)
        mvar = getattr(module, f"{name}_lora_m", None)
        if mvar is None or name not in geoms:
            return None
        a, b = getattr(module, f"{name}_lora_a")[...], getattr(module, f"{name}_lora_b")[...]
        s, geom = dict(module.lora_scale)[name], geoms[name]
        m, k = mvar[...], None

        def norm(w):
            return dora.weight_norm_stored(w, a, b, s, geom)

    else:
        mvar = getattr(module, "lora_m", None)
        if name != "kernel" or mvar is None:
            return None
        a, b, m, kpos = _factors_lead_first(module)
        k = getattr(module, "lora_stack_axis", None)

        def norm(w):
            return dora.init_magnitude(_lead_first(w, kpos), a, b, module.lora_scale)

    # fresh: m is the fp32 norm rounded to m's dtype (half an ulp of it), up to fp32 rounding
    # differences (4 ulp); 4 ulp of a bf16 m (3 %) would take a trained m for a fresh one
    old = norm(var.get_value()).astype(jnp.float32)
    tol = 0.5 * float(jnp.finfo(m.dtype).eps) + 4 * float(jnp.finfo(jnp.float32).eps)
    if not bool(jnp.all(jnp.abs(m.astype(jnp.float32) - old) <= tol * jnp.abs(old))):
        return None
    return mvar, _stored(norm(quant.dequantize_array(q)).astype(m.dtype), k)


def dequantize_nnx(model: nnx.Module) -> nnx.Module:
    """In place: every `QArray` of ``model`` back to a dense array (``q.shape`` in ``q.dtype``),
    each layer back to its class without the quantized base (LoRA factors kept)."""
    for _, module in _modules(model):
        qs = [v for _, v in _own_params(module) if quant.is_quantized(v.get_value())]
        for var in qs:
            var.set_value(quant.dequantize_array(var.get_value()))
        if qs or type(module) in _QBASES or isinstance(module, _QuantLayer):
            object.__setattr__(module, "__class__", _plain_class(type(module)))
    return model


def get_partition_spec(tree: Any, mesh: Any = None, *, rules: Any = None) -> Any:
    """``nnx.get_partition_spec`` for a state (or model) with quantized weights: a Variable
    holding a `QArray` gets a `QArray` of ``PartitionSpec``s, one per array, from the
    Variable's sharding names by `quant.partition_names` (codes and block scales sharded like
    the kernel; with ``mesh``, a name whose mesh axes do not divide an axis is dropped there).

    Logical names: flax's context rules (``nn.logical_axis_rules``) and a Variable's
    ``sharding_rules`` apply as in ``nnx.get_partition_spec``. ``rules`` (logical axis rules,
    as ``nn.logical_to_mesh_sharding`` takes) maps every Variable's names to mesh axes first,
    the kernel's as a whole (``nn.logical_to_mesh_axes``), so its codes and scales get the
    kernel's mesh axes: the specs are then for ``NamedSharding(mesh, spec)`` directly.

    >>> import jax, jax_lora
    >>> from flax import nnx
    >>> init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
    >>> with nnx.use_eager_sharding(False):
    ...     layer = nnx.Linear(128, 8, kernel_init=init, rngs=nnx.Rngs(0))
    >>> spec = get_partition_spec(nnx.state(jax_lora.quantize(layer, "nf4")))
    >>> spec["kernel"].get_value()
    QArray(nf4, codes=P('data', 'model'), scales=P('data', 'model'))
    """
    if isinstance(tree, nnx.Module):
        tree = nnx.state(tree)
    fits = None
    if mesh is not None:
        sizes = dict(mesh.shape)

        def fits(name: Any, size: int) -> bool:
            axes = (name,) if isinstance(name, str) else tuple(name)
            return size % math.prod(sizes.get(a, 1) for a in axes) == 0

    def spec_of(x: Any) -> Any:
        spec = nnx.get_partition_spec(x)
        if rules is None or not isinstance(spec, nnx.Variable) or spec.get_value() is None:
            return spec
        meta = x.get_metadata()
        names = meta.get("out_sharding") or tuple(spec.get_value())  # the logical names
        # `rules` first, then the Variable's own and the context's (as nnx.get_partition_spec)
        combined = (*rules, *meta.get("sharding_rules", ()), *(nn.get_logical_axis_rules() or ()))
        return spec.replace(nn.logical_to_mesh_axes(tuple(names), combined))

    def one(x: Any) -> Any:
        if isinstance(x, nnx.Variable) and quant.is_quantized(x.get_value()):
            q = x.get_value()
            names = tuple(spec_of(x).get_value())
            names = names + (None,) * (q.ndim - len(names))
            per = quant.partition_names(q, names, fits)
            return x.replace(q.replace(**{f: PartitionSpec(*n) for f, n in per.items()}))
        return spec_of(x)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
