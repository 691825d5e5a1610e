"""LoRA as a Flax linen module transformation: `wrap`, `init_lora` and the `disabled` switch.

`wrap` returns a module that shares the base module's scope (so ``params`` keeps exactly the
base tree) and runs it under an `nn.intercept_methods` interceptor. The interceptor gives each
targeted ``Dense``/``DenseGeneral``/``Einsum`` a ``lora`` collection entry ``{"a", "b"}`` in
that layer's own scope and adds the low-rank branch to its output.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.core
import flax.linen as nn
import jax
import numpy as np

from . import dora, factors, quant, weights
from .config import LoraConfig
from .switch import disabled as disabled
from .switch import lora_enabled
from .targets import (
    check_all_matched,
    class_name,
    explicitly_targeted,
    is_target,
    path_str,
    weight_path,
    weight_targeted,
)
from .trees import COLLECTION

SUPPORTED_LINEN = (nn.Dense, nn.DenseGeneral, nn.Einsum)


def _input(args: tuple, kwargs: Mapping[str, Any]) -> jax.Array:
    return args[0] if args else kwargs["inputs"]


def _geometry(module: nn.Module, args: tuple, kwargs: Mapping[str, Any], path: str):
    x = _input(args, kwargs)
    if isinstance(module, nn.Einsum):
        eq = kwargs.get("einsum_str") or (args[1] if len(args) > 1 else None) or module.einsum_str
        return factors.einsum_geometry(eq, tuple(module.shape), path)
    if isinstance(module, nn.DenseGeneral):
        return factors.dense_geometry(x.shape, module.features, module.axis, module.batch_dims)
    return factors.dense_geometry(x.shape, module.features)


def _boxes(box: Any, lead: tuple[int, ...], ins: tuple[int, ...], outs: tuple[int, ...]):
    """Partitioning for ``a`` and ``b`` inherited from a weight's flax metadata, if any.

    ``a`` takes the names of the weight's lead and input axes and replicates the rank axis; ``b``
    replicates the rank axis and takes the output-axis names. Works for
    ``nn.with_logical_partitioning`` (logical names) and ``nn.with_partitioning`` (mesh axes).
    Returns two functions value -> boxed value (identity when the weight carries no names).
    """
    names = getattr(box, "names", None)
    if not isinstance(box, nn.meta.AxisMetadata) or names is None or len(names) != box.value.ndim:
        return (lambda v: v), (lambda v: v)
    a_names = (*(names[i] for i in lead + ins), None)
    b_names = (*(names[i] for i in lead), None, *(names[i] for i in outs))
    return (
        lambda v: dataclasses.replace(box, value=v, names=a_names),
        lambda v: dataclasses.replace(box, value=v, names=b_names),
    )


def _factor_boxes(module: nn.Module, geom: factors.Geometry):
    """`_boxes` for a Dense-family kernel ``(lead..., in..., out...)``."""
    n_lead, n_in = len(geom.lead_shape), len(geom.in_shape)
    n = n_lead + n_in + len(geom.out_shape)
    return _boxes(
        module.get_variable("params", "kernel"),
        tuple(range(n_lead)),
        tuple(range(n_lead, n_lead + n_in)),
        tuple(range(n_lead + n_in, n)),
    )


def _factor(module: nn.Module, name: str, want: tuple[int, ...], init, path: str) -> jax.Array:
    value = module.variable(COLLECTION, name, init).value
    if tuple(value.shape) != want:
        raise ValueError(
            f"the `lora` variables at '{path}' have {name} of shape {tuple(value.shape)}, but "
            f"the layer and the config need {want}. Were these factors made with another "
            "rank or for another model?"
        )
    return value


def _direct_params(module: nn.Module) -> dict[str, Any]:
    """The arrays (possibly boxed) in the ``params`` of ``module``'s own scope."""
    if module.scope is None:
        return {}
    params = module.variables.get("params", {})
    return {k: v for k, v in params.items() if not isinstance(v, Mapping)}


@dataclasses.dataclass
class _Probe:
    """Notes the module calls made while a layer is traced for analysis."""

    first: Any = None
    container: bool = False  # a child sharing the layer's scope (nn.share_scope) ran
    submodules: bool = False  # a child with its own scope ran

    def seen(self, module: nn.Module, method: str) -> None:
        if method == "setup":
            return
        if self.first is None:
            self.first = module
        elif module is not self.first and module.scope is self.first.scope:
            self.container = True
        elif module.scope is not self.first.scope:
            self.submodules = True


_PROBE: contextvars.ContextVar[_Probe | None] = contextvars.ContextVar(
    "jax_lora_probe", default=None
)


def _gathered_lookup(module: nn.Embed, whole: Callable[..., Any]) -> Callable[..., Any]:
    """A quantized ``nn.Embed``'s lookup that dequantizes only the rows it takes
    (`quant.take_dequantized`), bit-identical to ``nn.Embed.__call__`` on the dequantized table;
    ``whole`` (that call) where the table cannot be gathered so (blocks along the rows, double
    quantization, a single-row table). LoRA on the table itself does not come here: its call
    runs `_evaluate_quantized`, and ``whole`` only when the adapters are off."""

    def call(inputs: Any) -> Any:
        q = module.variables.get("params", {}).get("embedding")
        rows = quant.embed_rows(q, inputs, module.num_embeddings)
        if rows is None:
            return whole(inputs)
        (rows,) = module.promote_dtype(rows, dtype=module.dtype, inexact=False)
        return rows

    return call


def _unintercepted(fn):
    """``fn`` run as a layer's own code (its nested ``apply`` is not adapted again)."""

    def run(*args, **kwargs):
        token = _PROBE.set(_Probe())
        try:
            return fn(*args, **kwargs)
        finally:
            _PROBE.reset(token)

    return run


@dataclasses.dataclass
class _Trace:
    closed: Any
    out_tree: Any
    flat: list
    probe: _Probe


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _trace(module: nn.Module, method: str, args, kwargs, names: list[str]) -> _Trace:
    """Trace ``module.<method>(*args, **kwargs)`` as a function of its weights ``names`` (the
    first ``len(names)`` jaxpr inputs) and its other arrays; non-array arguments stay static."""
    variables = {col: dict(v) for col, v in module.variables.items()}
    ws = [variables["params"].pop(n) for n in names]
    # a `QArray` is one input, traced as the array it stands for (see `_evaluate_quantized`)
    flat, tree = jax.tree.flatten((ws, variables, args, kwargs), is_leaf=quant.is_quantized)
    dyn = [_is_array(leaf) or quant.is_quantized(leaf) for leaf in flat]
    clone = module.clone(parent=None)

    def run(*values):
        it = iter(values)
        leaves = [next(it) if d else leaf for leaf, d in zip(flat, dyn, strict=True)]
        ws, variables, args, kwargs = jax.tree.unflatten(tree, leaves)
        variables["params"] = {**variables["params"], **dict(zip(names, ws, strict=True))}
        return clone.apply(variables, *args, method=method, **kwargs)

    probe = _Probe()
    token = _PROBE.set(probe)
    try:
        values = [leaf for leaf, d in zip(flat, dyn, strict=True) if d]
        closed, out_shape = jax.make_jaxpr(run, return_shape=True)(*map(quant.abstract, values))
    finally:
        _PROBE.reset(token)
    return _Trace(closed, jax.tree.structure(out_shape), values, probe)


def _geometry_of_factors(node, shape, uses, derived, wpath: str, rank: int):
    """The roles that existing factors ``node`` imply for a weight of ``shape`` (the ones derived
    from this call's uses when several fit)."""
    a, b = (node.get("a"), node.get("b")) if isinstance(node, Mapping) else (None, None)
    if (
        a is None
        or b is None
        or np.ndim(a) < 2
        or np.ndim(b) < 2
        or set(node) - {"m"} != {"a", "b"}
    ):
        raise ValueError(
            f"the `lora` entry at '{wpath}' must be {{'a': array, 'b': array}}, got "
            f"{jax.tree.map(np.shape, dict(node)) if isinstance(node, Mapping) else node!r}"
        )
    fits = []
    for g in weights.geometry_from_shapes(shape, tuple(np.shape(a)), tuple(np.shape(b))):
        try:
            weights.check_uses(g, uses)
        except weights.Unsupported:
            continue
        fits.append(g)
    if np.shape(a)[-1] != rank or not fits:
        want = (derived.a_shape(rank), derived.b_shape(rank)) if derived else "?"
        raise ValueError(
            f"the `lora` entry at '{wpath}' has a {tuple(np.shape(a))}, b {tuple(np.shape(b))}, "
            f"which do not fit the weight {shape} at rank {rank} (expected {want}). Were these "
            "factors made with another rank or for another model?"
        )
    return derived if derived in fits else fits[0]


def _magnitude(module, geom, a, b, cfg: LoraConfig, path: str) -> jax.Array:
    """DoRA's ``lora/<layer>/m: (lead..., out...)``, made as PEFT does: ``‖W + s·a@b‖``."""

    def init():
        box = module.get_variable("params", "kernel")
        kernel = quant.dequantize(nn.meta.unbox(box))  # a quantized base: its dequantized values
        m = dora.init_magnitude(kernel, a, b, cfg.scale, cfg.param_dtype)
        names = getattr(box, "names", None)  # partitioned as the kernel's lead and out axes
        if (
            isinstance(box, nn.meta.AxisMetadata)
            and names is not None
            and len(names) == box.value.ndim
        ):
            n_lead, n_in = len(geom.lead_shape), len(geom.in_shape)
            return dataclasses.replace(box, value=m, names=names[:n_lead] + names[n_lead + n_in :])
        return m

    return _factor(module, dora.MAGNITUDE, dora.magnitude_shape(geom), init, path)


def _dora(module, y, x, drop, a, b, m, geom, cfg: LoraConfig):
    """DoRA's output for a Dense-family call; with dropout running, the base part is the
    layer's own matmul of the dropped-out input (as PEFT), without its bias."""
    params = module.variables["params"]
    kernel = nn.meta.unbox(params["kernel"])  # QLoRA + DoRA: dequantized in `dora.apply_on`
    bias = nn.meta.unbox(params["bias"]) if "bias" in params else None
    dropped = drop is not None
    return dora.apply_on(y, bias, x, dropped, kernel, a, b, m, geom, cfg.scale, module.precision)


class _Interceptor:
    """Adds the LoRA branch to every targeted layer call; records what it saw."""

    def __init__(self, wrapper: LoraWrapped, *, discover: bool = False, heads=frozenset()):
        self.wrapper = wrapper
        self.discover = discover  # only note each layer's output (to find the output head)
        self.heads = heads  # targets=None leaves these (the output head) alone
        self.outputs: list[tuple[str, Any]] = []  # (path, the layer's output) per layer call
        self.missing: list[tuple[str, Any]] = []  # targets=None layers without factors
        self.config = wrapper.config
        self.enabled = wrapper.enabled and lora_enabled()
        self.candidates: list[tuple[str, str]] = []
        self.containers: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []
        self.seen: list[tuple[str, str]] = []  # every matrix weight of a non-Dense layer met
        self.calls = 0  # layer calls seen: none when `nn.jit` reused a trace (checked then)
        self.used: set[tuple[str, ...]] = set()
        self.geoms: dict[str, weights.WeightGeometry] = {}
        self.call_training: bool | None = None  # from the wrapped call's deterministic=/train=
        self.setup_cut: set[int] = set()  # ids of quantized layers whose `setup` could not run

    def __call__(self, next_fun, args, kwargs, context):
        module, method = context.module, context.method_name
        probe = _PROBE.get()
        if probe is not None:  # tracing a layer for analysis: run the base code as it is
            probe.seen(module, method)
            return next_fun(*args, **kwargs)
        if (  # the base's own method (it shares the wrapper's scope): the wrapped call's keywords
            self.call_training is None
            and method != "setup"
            and tuple(module.path) == tuple(self.wrapper.path)
        ):
            if isinstance(kwargs.get("deterministic"), bool):
                self.call_training = not kwargs["deterministic"]
            elif isinstance(kwargs.get("train"), bool):
                self.call_training = kwargs["train"]
        if not self._in_tree(module):
            return next_fun(*args, **kwargs)  # e.g. a nested `apply` of a module made on the fly
        if tuple(module.path) != tuple(self.wrapper.path):
            self.calls += 1
        plain = next_fun
        if quant.layer_has_quantized(module):  # QLoRA: a quantized base
            if method == "setup":
                return self._quantized_setup(module, next_fun, args, kwargs)
            next_fun = quant.dequantized_call(module, method, COLLECTION, _unintercepted)
            if method == "__call__" and type(module).__call__ is nn.Embed.__call__:
                next_fun = _gathered_lookup(module, next_fun)
        if isinstance(module, SUPPORTED_LINEN):
            if method != "__call__":
                return next_fun(*args, **kwargs)
            return self._dense(module, next_fun, args, kwargs)
        if method == "setup" or (method.startswith("_") and method != "__call__"):
            return next_fun(*args, **kwargs)
        return self._generic(module, method, next_fun, args, kwargs, plain)

    def _quantized_setup(self, module, next_fun, args, kwargs):
        """A quantized layer's ``setup`` on the real module: a container's ``setup`` children
        must exist (they adapt its calls). Where ``setup`` makes a quantized weight itself,
        flax's shape check fails on the codes: the layer's methods then run on clones that set
        up on the dequantized weights (`quant.dequantized_call`)."""
        try:
            out = next_fun(*args, **kwargs)
        except flax.errors.ScopeParamShapeError:
            self.setup_cut.add(id(module))
            return None
        # int8 codes have the weight's shape: flax's check passes and `setup` holds the QArray
        held = jax.tree.leaves(dict(vars(module)), is_leaf=quant.is_quantized)
        if any(quant.is_quantized(x) for x in held):
            self.setup_cut.add(id(module))
        return out

    def _in_tree(self, module: nn.Module) -> bool:
        """Whether ``module`` belongs to the wrapped model (not to a nested ``apply``)."""
        m = module
        while isinstance(m, nn.Module):
            if m is self.wrapper or (m.scope is not None and m.scope is self.wrapper.scope):
                return True
            if m.parent is None:
                return False  # the top of another `apply`
            m = m.parent
        return True  # a scope: inside a lifted transform (nn.remat, nn.scan, ...) of ours

    def _dropout(self, module: nn.Module, path: str):
        """``x -> dropout(x)`` when LoRA dropout runs for this call (the base model runs in
        training mode: the rule is documented on `LoraWrapped`), else None."""
        rate = self.config.dropout
        if rate <= 0:
            return None
        training = self.call_training
        if training is None and self.wrapper.deterministic is not None:
            training = not self.wrapper.deterministic
        if training is None:
            training = module.has_rng("dropout")
        if not training:
            return None
        if not (module.has_rng("dropout") or module.has_rng("params")):
            raise ValueError(
                f"LoRA dropout at '{path}' runs in training mode, but `apply` got no "
                "'dropout' rng: pass rngs={'dropout': key}, or deterministic=True / "
                "train=False for evaluation."
            )
        return lambda x: factors.dropout(x, rate, module.make_rng("dropout"))

    def _dense(self, module, next_fun, args, kwargs):
        path = path_str(module.path)
        self.candidates.append((path, type(module).__name__))
        if not (is_target(self.config, path) or self._kernel_named(path)) or path in self.heads:
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        if self.discover:
            self.outputs.append((path, y))
            return y
        self.used.add(tuple(module.path))
        creating = module.is_mutable_collection(COLLECTION)
        if not self.enabled and not creating:
            return y
        cfg = self.config.for_path(path)  # this layer's rank and alpha (rank_pattern, ...)
        geom = _geometry(module, args, kwargs, path)
        if not module.has_variable(COLLECTION, "a"):
            if not creating and cfg.targets is None:
                self.missing.append((path, y))  # fine if it is the output head (checked later)
                return y
            if not creating:
                raise ValueError(
                    f"no LoRA factors for the targeted layer '{path or '<root>'}': the variables "
                    "passed to `apply` have no `lora` entry there. Create them with "
                    "`wrapped.init` or `jax_lora.init_lora`, or run the base module for the "
                    "plain model."
                )
            if cfg.targets is None and cfg.rank > min(geom.fan_in, geom.fan_out):
                self.skipped.append((path, f"rank {cfg.rank} > min(fan_in, fan_out)"))
                self.used.discard(tuple(module.path))
                return y
            factors.check_rank(geom, cfg.rank, path)
            box_a, box_b = _factor_boxes(module, geom)
        else:
            box_a = box_b = None  # the factors exist: their initialisers never run
        a = _factor(
            module,
            "a",
            (*geom.a_shape, cfg.rank),
            lambda: box_a(factors.init_a(module.make_rng("params"), geom, cfg)),
            path,
        )
        b = _factor(
            module,
            "b",
            (*geom.lead_shape, cfg.rank, *geom.out_shape),
            lambda: box_b(factors.init_b(geom, cfg)),
            path,
        )
        if not creating or module.has_variable(COLLECTION, dora.MAGNITUDE):
            dora.check_agrees(module.has_variable(COLLECTION, dora.MAGNITUDE), cfg.use_dora, path)
        m = _magnitude(module, geom, a, b, cfg, path) if cfg.use_dora else None
        if not self.enabled:
            return y
        x = _input(args, kwargs).astype(y.dtype)
        drop = self._dropout(module, path)
        if drop is not None:
            x = drop(x)
        if m is not None:
            return _dora(module, y, x, drop, a, b, m, geom, cfg)
        return y + factors.branch(x, a, b, geom, cfg.scale, module.precision)

    def _kernel_named(self, path: str) -> bool:
        """A weight-path pattern naming a Dense-family kernel (``fc/kernel``) targets it."""
        return self.config.targets is not None and weight_targeted(self.config, path, "kernel")

    def _generic(self, module, method, next_fun, args, kwargs, plain=None):
        """Any other layer: adapt the targeted weights its ``method`` contracts. ``plain``: the
        method itself, when ``next_fun`` runs it dequantized (its children must run as they are)."""
        cfg = self.config
        mpath = path_str(module.path)
        if mpath in self.heads:
            return next_fun(*args, **kwargs)
        # `init`: the call creates the params (with nn.share_scope, a sibling may have made
        # some already), so run it first and adapt nothing in this call (b = 0 anyway)
        new_params = module.is_initializing() and module.is_mutable_collection("params")
        y = next_fun(*args, **kwargs) if new_params else None
        owned = _direct_params(module)
        self.seen.extend(
            (weight_path(mpath, n), class_name(module))
            for n, v in owned.items()
            if np.ndim(nn.meta.unbox(v)) >= 2
        )
        names = [
            n
            for n, v in owned.items()
            if weight_targeted(cfg, mpath, n) and np.ndim(nn.meta.unbox(v)) >= 2
        ]
        if not names:
            if explicitly_targeted(cfg, mpath):
                if owned:
                    shapes = {n: np.shape(nn.meta.unbox(v)) for n, v in owned.items()}
                    raise ValueError(
                        f"`targets` matches module '{mpath}' of type {class_name(module)}, which "
                        f"has no weight LoRA can adapt (its weights {shapes} are not matrices "
                        "fed to a matmul, einsum, convolution or lookup). Narrow the pattern, or "
                        f"add '{mpath}' to `exclude`."
                    )
                self.containers.append((mpath, class_name(module)))
            return y if new_params else next_fun(*args, **kwargs)
        trace = _trace(module, method, args, kwargs, names)
        if trace.probe.container:  # nn.share_scope children own the calls: they adapt them
            if id(module) in self.setup_cut:
                raise ValueError(
                    f"'{mpath}' ({class_name(module)}) holds quantized weights that its own "
                    "`setup` creates (`self.param`), and `nn.share_scope` children that adapt "
                    "its calls: its `setup` cannot run on the codes, so the children would not "
                    "exist. Leave its `setup` weights out of `quantize` (`targets=`), or create "
                    "them in the children (or in an `@nn.compact` method)."
                )
            return y if new_params else (plain or next_fun)(*args, **kwargs)
        creating = module.is_mutable_collection(COLLECTION)
        uses = weights.analyse(trace.closed, range(len(names)))
        if self.discover:
            y = y if new_params else next_fun(*args, **kwargs)
            if any(isinstance(u, list) and u and u[0].kind == "dot" for u in uses):
                self.outputs.append((mpath, y))
            return y
        adapters, missing = {}, False
        for i, name in enumerate(names):
            adapter = self._adapter(module, mpath, name, owned[name], uses[i], trace, creating)
            missing |= adapter is _MISSING
            if isinstance(adapter, weights.Adapter):
                adapters[i] = adapter
        if new_params:
            return y
        if not adapters or not self.enabled:
            y = next_fun(*args, **kwargs)
        elif any(map(quant.is_quantized, trace.flat)):
            y = self._evaluate_quantized(module, trace, adapters, args, kwargs)
        else:
            y = jax.tree.unflatten(
                trace.out_tree, weights.evaluate(trace.closed, trace.flat, adapters)
            )
        if missing:
            self.missing.append((mpath, y))
        return y

    def _evaluate_quantized(self, module, trace, adapters, args, kwargs):
        """`weights.evaluate` of a layer holding `QArray`s: the traced layer runs on the
        dequantized weights inside `quant.dequantized_evaluate`, so its backward pass recomputes
        the dequantization; the factors (and the layer's other inputs) get their gradients."""
        keys = {}
        for i, ad in adapters.items():
            if ad.dropout is not None:  # one key per weight, made once: the backward pass
                keys[i] = module.make_rng("dropout")  # re-runs the layer with the same masks
        rate = self.config.dropout

        def run(values, ab):
            live = {}
            for i, ad in adapters.items():
                drop = None
                if i in keys:
                    count = itertools.count()  # per use of the weight, the same each run
                    drop = lambda x, k=keys[i], c=count: factors.dropout(  # noqa: E731
                        x, rate, jax.random.fold_in(k, next(c))
                    )
                a, b, m = ab[i]
                live[i] = dataclasses.replace(ad, a=a, b=b, m=m, dropout=drop)
            return weights.evaluate(trace.closed, values, live)

        ab = {i: (ad.a, ad.b, ad.m) for i, ad in adapters.items()}  # DoRA's m is trained too
        marker = quant.input_marker((args, kwargs))
        flat = quant.dequantized_evaluate(run, list(trace.flat), ab, marker)
        return jax.tree.unflatten(trace.out_tree, flat)

    def _adapter(self, module, mpath, name, boxed, uses, trace, creating):
        """The `weights.Adapter` for weight ``name`` (creating its factors), or None to skip."""
        wpath = weight_path(mpath, name)
        cfg = self.config.for_path(wpath)  # this weight's rank and alpha (rank_pattern, ...)
        kind = class_name(module)
        shape = tuple(np.shape(nn.meta.unbox(boxed)))
        submodules = "its module also calls submodules, which LoRA cannot follow from it"
        geom, why = weights.decide(
            cfg, wpath, kind, shape, uses, submodules if trace.probe.submodules else None
        )
        if geom is None:
            if why is not None:
                self.skipped.append((wpath, why))
            return None
        scope = module.scope  # not `module.variable`: setup-style layers (Embed) work too
        node = None
        if scope.has_variable(COLLECTION, name):
            # the factors fix the roles (e.g. Embed: `attend` contracts the lookup's output axis)
            node = nn.meta.unbox(scope.get_variable(COLLECTION, name))
            geom = _geometry_of_factors(node, shape, uses, geom, wpath, cfg.rank)
        fg = factors.Geometry(
            kind="generic",
            lead_shape=tuple(geom.shape[i] for i in geom.lead),
            in_shape=tuple(geom.shape[i] for i in geom.ins),
            out_shape=tuple(geom.shape[i] for i in geom.outs),
        )
        self.candidates.append((wpath, kind))
        self.candidates.append((mpath, kind))
        self.used.add((*module.path, name))
        self.geoms[path_str((*module.path[len(self.wrapper.path) :], name))] = geom
        if node is None:
            if not creating and cfg.targets is None:
                return _MISSING  # fine if it is the output head (checked once the call is done)
            if not creating:
                raise ValueError(
                    f"no LoRA factors for the targeted weight '{wpath}': the variables passed "
                    "to `apply` have no `lora` entry there. Create them with `wrapped.init` or "
                    "`jax_lora.init_lora`."
                )
            factors.check_rank(fg, cfg.rank, wpath)
            box_a, box_b = _boxes(boxed, geom.lead, geom.ins, geom.outs)
            key = module.make_rng("params")
            scope.put_variable(
                COLLECTION,
                name,
                {"a": box_a(factors.init_a(key, fg, cfg)), "b": box_b(factors.init_b(fg, cfg))},
            )
            node = nn.meta.unbox(scope.get_variable(COLLECTION, name))
        a, b = node["a"], node["b"]
        m = self._generic_magnitude(
            scope, name, node, boxed, geom, uses, a, b, cfg, wpath, creating
        )
        return weights.Adapter(geom, a, b, cfg.scale, self._dropout(module, wpath), m)

    def _generic_magnitude(self, scope, name, node, boxed, geom, uses, a, b, cfg, wpath, creating):
        """DoRA's ``m: (lead..., out...)`` of a non-Dense weight (made as PEFT: ``‖W‖``), kept in
        its factor node ``lora/<layer>/<weight>/m``; None for plain LoRA."""
        if not creating or dora.MAGNITUDE in node:
            dora.check_agrees(dora.MAGNITUDE in node, cfg.use_dora, wpath)
        if not cfg.use_dora:
            return None
        dora.check_uses(geom, uses, wpath)
        want = tuple(geom.shape[i] for i in geom.lead + geom.outs)
        if dora.MAGNITUDE not in node:
            w = quant.dequantize(nn.meta.unbox(boxed))
            m = dora.weight_norm_stored(w, a, b, cfg.scale, geom).astype(cfg.param_dtype)
            names = getattr(boxed, "names", None)  # partitioned as the weight's lead, out axes
            if (
                isinstance(boxed, nn.meta.AxisMetadata)
                and names is not None
                and len(names) == boxed.value.ndim
            ):
                m = dataclasses.replace(
                    boxed, value=m, names=tuple(names[i] for i in geom.lead + geom.outs)
                )
            raw = dict(scope.get_variable(COLLECTION, name))
            scope.put_variable(COLLECTION, name, {**raw, dora.MAGNITUDE: m})
            node = nn.meta.unbox(scope.get_variable(COLLECTION, name))
        m = node[dora.MAGNITUDE]
        if tuple(np.shape(m)) != want:
            raise ValueError(
                f"the DoRA magnitude 'm' at '{wpath}' has shape {tuple(np.shape(m))}, but the "
                f"weight {geom.describe()} needs (lead..., out...) = {want}. Were these factors "
                "made for another model?"
            )
        return m


_MISSING = object()  # `_adapter`: targets=None and no factors (the output head, if all is well)


def _output_leaves(out: Any) -> list[Any]:
    if isinstance(out, Mapping):  # e.g. transformers' ModelOutput (an OrderedDict subclass)
        out = dict(out)
    return jax.tree.leaves(out)


def _heads(outputs: list[tuple[str, Any]], out: Any) -> frozenset[str]:
    """The layers whose output *is* the model's output (the head), when there are others."""
    leaves = _output_leaves(out)
    heads = {p for p, y in outputs if y is not None and any(y is leaf for leaf in leaves)}
    return frozenset(heads) if len({p for p, _ in outputs}) > len(heads) else frozenset()


def share_scope(wrapper: nn.Module, base: nn.Module) -> None:
    """``nn.share_scope(wrapper, base)``, then the module paths of ``base``'s existing children
    corrected: flax re-parents their scopes but keeps the old ``path`` (an ``nn.Sequential``'s
    layers, bound with it, kept ``('base', 'layers_0')`` while their params sit at
    ``layers_0``), and `targets` are matched against these paths."""
    nn.share_scope(wrapper, base)

    def fix(module: nn.Module) -> None:
        for child in module._state.children.values():
            scope = getattr(child, "scope", None)
            if not isinstance(child, nn.Module) or scope is None or scope.parent is None:
                continue
            want = (*scope.parent.path, scope.name)
            if tuple(scope.path) != want:
                scope.path = want
            fix(child)

    fix(base)


class LoraWrapped(nn.Module):
    """A linen module computing ``base`` with LoRA on the layers that ``config`` targets.

    Made by `wrap`. Same call signature and ``params`` tree as ``base``; the factors live in
    the ``lora`` collection. Attributes:

    - ``base``: the wrapped (unbound) module.
    - ``config``: the `LoraConfig`.
    - ``enabled``: ``False`` gives exactly the base output (a jit-safe `disabled`).
    - ``deterministic``: the train/eval mode when the call does not say it (default ``None``).

    LoRA dropout runs exactly when the base model runs in training mode, decided in this order:

    1. a ``deterministic=`` or ``train=`` keyword (a Python bool) of the wrapped call
       (``apply(v, x, deterministic=False)`` trains; ``deterministic=True`` or ``train=False``
       evaluates, even when ``rngs={"dropout": key}`` is given);
    2. else the ``deterministic`` attribute, if not ``None`` (``wrapped.clone(deterministic=True)``);
    3. else: training exactly when ``apply`` gets ``rngs={"dropout": key}``.

    Training without a ``"dropout"`` rng raises an error that names the layer (``init`` uses
    the ``"params"`` rng instead, as linen's own ``make_rng`` does).
    """

    base: nn.Module
    config: LoraConfig
    enabled: bool = True
    deterministic: bool | None = None

    def setup(self) -> None:
        share_scope(self, self.base)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._keyed(kwargs):
            return self._run(lambda: self.base(*args, **kwargs))

    def call_method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run another method of ``base`` with LoRA:
        ``wrapped.apply(variables, "encode", x, method="call_method")``."""
        with self._keyed(kwargs):
            return self._run(lambda: getattr(self.base, name)(*args, **kwargs), whole_model=False)

    @contextlib.contextmanager
    def _keyed(self, kwargs: Mapping[str, Any]) -> Iterator[None]:
        """Put what this call's LoRA depends on (config, on/off, train/eval) into the scope's
        flags while it runs. ``nn.jit`` inside the model (gemma's ``Transformer``) keys its
        trace cache on the scope, so an ``apply`` under `disabled` or in eval mode never reuses
        a trace made with LoRA on or in training (and the reverse)."""
        mode = tuple(kwargs.get(k) for k in ("deterministic", "train"))
        mode = tuple(m if isinstance(m, bool) else None for m in mode)
        key = (self.config, self.enabled and lora_enabled(), self.deterministic, mode)
        if _GEOMS.get() is not None:
            key += (id(_GEOMS.get()),)  # `weight_geometries` needs a fresh trace to read
        scope = self.scope
        before = scope.flags
        scope.flags = flax.core.freeze({**before, "jax_lora": hash(key)})
        try:
            yield
        finally:
            scope.flags = before

    def _run(self, fn, whole_model: bool = True) -> Any:
        """Run ``fn`` under the interceptor. Only a whole-model call checks the targets and the
        `lora` tree against the layers it met (a method may touch some layers only)."""
        heads: frozenset[str] = frozenset()
        if whole_model and self.config.targets is None and self.is_mutable_collection(COLLECTION):
            # "all-linear" leaves out the output head: a first pass finds it
            probe = _Interceptor(self, discover=True)
            with nn.intercept_methods(probe):
                heads = _heads(probe.outputs, fn())
        interceptor = _Interceptor(self, heads=heads)
        with nn.intercept_methods(interceptor):
            out = fn()
        if interceptor.missing:
            leaves = _output_leaves(out)
            others = {path_str(p) for p in interceptor.used} - {p for p, _ in interceptor.missing}
            for path, y in interceptor.missing:
                if not others or not any(y is leaf for leaf in leaves):
                    raise ValueError(
                        f"no LoRA factors for the layer '{path or '<root>'}': the variables "
                        "passed to `apply` have no `lora` entry there. Create them with "
                        "`wrapped.init` or `jax_lora.init_lora`."
                    )
        sink = _GEOMS.get()
        if sink is not None:
            sink.update(interceptor.geoms)
        if not whole_model or interceptor.calls == 0:
            return out  # (no calls: an `nn.jit` in the model reused a trace checked when made)
        if self.is_mutable_collection(COLLECTION):
            found = list(dict.fromkeys(interceptor.candidates))
            if not found and interceptor.seen and self.config.targets is not None:
                listing = "\n".join(f"  {p}  ({t})" for p, t in interceptor.seen[:50])
                why = "".join(f"\n  {p}: {w}" for p, w in interceptor.skipped[:20])
                raise ValueError(
                    f"`targets` pattern {', '.join(map(repr, self.config.targets))} matches no "
                    "weight LoRA can adapt "
                    "(patterns are re.fullmatch'ed against module paths and weight paths). "
                    f"Weights seen:\n{listing}" + (f"\nSeen but not adaptable:{why}" if why else "")
                )
            try:
                check_all_matched(
                    self.config, list(dict.fromkeys(interceptor.candidates)), interceptor.containers
                )
            except ValueError as e:
                if not interceptor.skipped:
                    raise
                why = "\n".join(f"  {p}: {w}" for p, w in interceptor.skipped[:20])
                raise ValueError(f"{e}\nWeights seen but not adaptable:\n{why}") from None
            self.config.check_patterns(sorted(path_str(p) for p in interceptor.used))
            interceptor.skipped = [
                (p, w) for p, w in interceptor.skipped if self.config.targets is None
            ]
            if interceptor.skipped:
                listing = "; ".join(f"{p} ({why})" for p, why in interceptor.skipped[:20])
                more = len(interceptor.skipped) - 20
                warnings.warn(
                    f"jax_lora: targets=None skipped {len(interceptor.skipped)} weight(s) LoRA "
                    f"cannot adapt as linear layers: {listing}"
                    + (f"; ... and {more} more" if more > 0 else ""),
                    stacklevel=4,
                )
        elif interceptor.enabled:
            self._check_no_stray_factors(interceptor.used)
        return out

    def _check_no_stray_factors(self, used: set[tuple[str, ...]]) -> None:
        lora = nn.meta.unbox(self.variables.get(COLLECTION, {}))
        n = len(self.path)
        used_rel = {p[n:] for p in used}
        for p, _ in factors.factor_nodes(lora):
            if p not in used_rel:
                raise ValueError(
                    f"the `lora` variables have factors at '{path_str(p)}', but no targeted "
                    "layer is there under this config. Were they made with other `targets` or "
                    "for another model?"
                )


def wrap(
    module: Any,
    config: LoraConfig,
    *,
    name: str | None = None,
    rngs: Any = None,
    example: Any = None,
    stack_axis: int | None = None,
) -> Any:
    """Add LoRA to ``module``: a module transformation.

    Args:
      module: a ``flax.linen.Module`` definition (any model: the layers are found by path).
      config: the `LoraConfig` saying which layers and how; for a linen module also
        ``{name: LoraConfig}``: named adapters (a `jax_lora.adapters.MultiLoraWrapped`).
      name: the wrapper's name when it is made inside a parent module's compact method
        (paths matched by ``targets`` then start with it).
      rngs: NNX only: ``nnx.Rngs`` for the factor init and LoRA dropout (see `wrap_nnx`).
      example: NNX only: an example call ``(args...)`` / ``(args, kwargs)`` (see `wrap_nnx`).
      stack_axis: NNX only: the axis ``nnx.vmap`` stacked layers along (see `wrap_nnx`).

    An ``nnx.Module`` is adapted in place instead (graph surgery, see `jax_lora.nnx.wrap_nnx`)
    and returned.

    Returns:
      A `LoraWrapped` module with ``module``'s call signature. ``wrapped.init(key, *args)``
      gives ``{"params": <exactly module's params tree>, "lora": {<layer path>: {"a", "b"}}}``
      with ``a: (in..., rank)`` and ``b: (rank, out...)`` per targeted kernel ``(in..., out...)``.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jax_lora
    >>> model = jax_lora.wrap(nn.Dense(16), jax_lora.LoraConfig(rank=4))
    >>> v = model.init(jax.random.key(0), jnp.ones((2, 8)))
    >>> jax.tree.map(jnp.shape, v["lora"])
    {'a': (8, 4), 'b': (4, 16)}
    """
    if isinstance(config, Mapping):
        from .adapters import wrap_adapters  # named adapters: {name: LoraConfig}

        return wrap_adapters(module, config, name=name, rngs=rngs, stack_axis=stack_axis)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jax_lora.LoraConfig, got {type(config).__name__}")
    from flax import nnx

    if isinstance(module, nnx.Module):
        from .nnx import wrap_nnx

        return wrap_nnx(module, config, rngs=rngs, example=example, stack_axis=stack_axis)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"jax_lora.wrap expects a flax.linen.Module or an nnx.Module, got {type(module).__name__}"
        )
    if isinstance(module, LoraWrapped):
        raise ValueError(
            "this module is already wrapped with LoRA (a LoraWrapped); wrap the base model once "
            "with one LoraConfig (list all targets in it), or merge the first adapter "
            "(`jax_lora.merge`) and wrap the plain model again"
        )
    # A module made inside a parent's compact method comes attached to that parent; the
    # wrapper adopts a detached copy so that its params land under the wrapper's own name.
    return LoraWrapped(base=module.clone(parent=None), config=config, name=name)


_GEOMS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("jax_lora_geoms", default=None)


def weight_geometries(
    wrapped: LoraWrapped, variables: Mapping[str, Any], *args: Any, **kwargs: Any
) -> dict[str, weights.WeightGeometry]:
    """The axis roles of every adapted non-Dense weight (path -> `weights.WeightGeometry`),
    read off one abstract trace of ``wrapped.apply(variables, *args, **kwargs)`` (no compute)."""
    sink: dict[str, weights.WeightGeometry] = {}
    token = _GEOMS.set(sink)
    try:
        jax.eval_shape(lambda v: wrapped.apply(v, *args, **kwargs), dict(variables))
    finally:
        _GEOMS.reset(token)
    return sink


def init_lora(
    wrapped: LoraWrapped, key: jax.Array, variables: Mapping[str, Any], *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """Create fresh LoRA factors for existing (e.g. pretrained) ``variables``.

    Runs one forward pass of ``wrapped`` on ``*args`` with ``variables`` (the base model's,
    e.g. ``{"params": pretrained}``) and returns the new ``lora`` tree; nothing in
    ``variables`` is re-initialised or changed. ``key`` seeds the ``a`` factors.
    """
    if COLLECTION in variables:
        raise ValueError("`variables` already has a `lora` collection; nothing to initialise.")
    _, state = wrapped.apply(
        dict(variables), *args, rngs={"params": key}, mutable=[COLLECTION], **kwargs
    )
    return state[COLLECTION]
