"""LoRA on any weight: find where a traced function contracts a weight, and add the branch there.

A layer's method is traced to a jaxpr with its weights as inputs. Each weight is followed
through views (``transpose``, ``convert_element_type``, ``copy``, sharding constraints, nested
``jit``/``custom_jvp`` calls) to the ops that consume it:

- ``dot_general`` (``jnp.dot``/``matmul``/``einsum``/``@``, either operand),
- ``conv_general_dilated`` (the kernel operand, ``feature_group_count == 1``),
- ``gather`` of whole rows (``jnp.take(table, ids, axis=0)``: an embedding lookup).

The weight's axes get roles read off its first use (a lookup, if any, decides): ``in`` (contracted
with the input, or gathered), ``out`` (the rest) and ``lead`` (a stack of separate projections,
see `roles`). Factors are ``a: (lead..., in..., r)`` and ``b: (lead..., r, out...)`` with each group
in the weight's stored axis order, so ``W += scale * a @ b`` folds back into the stored layout
through `WeightGeometry.fold`. The traced function is then evaluated op by op with the same
primitives (the base output is bit-identical) plus ``scale * (x @ a) @ b`` at each use: two
contractions through the rank, never ``W + a @ b``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from .factors import delta_kernel

# Ops that only change how the weight is viewed. Everything else is a use we must understand.
_PASS = {"convert_element_type", "copy", "copy_p", "sharding_constraint", "optimization_barrier"}
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr"}
_CUSTOM = {"custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr"}
_REMAT = {"remat", "checkpoint", "remat2"}


@dataclasses.dataclass(frozen=True)
class WeightGeometry:
    """Axis roles of one stored weight. ``lead``/``ins``/``outs`` are stored-axis indices."""

    shape: tuple[int, ...]
    lead: tuple[int, ...]
    ins: tuple[int, ...]
    outs: tuple[int, ...]

    @property
    def fan_in(self) -> int:
        return math.prod(self.shape[i] for i in self.ins)

    @property
    def fan_out(self) -> int:
        return math.prod(self.shape[i] for i in self.outs)

    def a_shape(self, rank: int) -> tuple[int, ...]:
        return (*(self.shape[i] for i in self.lead + self.ins), rank)

    def b_shape(self, rank: int) -> tuple[int, ...]:
        return (*(self.shape[i] for i in self.lead), rank, *(self.shape[i] for i in self.outs))

    @property
    def standard(self) -> bool:
        """Whether the stored order is ``(lead..., in..., out...)`` (no transpose to fold)."""
        return self.lead + self.ins + self.outs == tuple(range(len(self.shape)))

    def to_stored(self, delta: jax.Array) -> jax.Array:
        """``delta: (lead..., in..., out...)`` -> the weight's stored axis order."""
        order = self.lead + self.ins + self.outs
        return jnp.transpose(delta, tuple(int(i) for i in np.argsort(order)))

    def describe(self) -> str:
        names = {**{i: "lead" for i in self.lead}, **{i: "in" for i in self.ins}}
        names.update({i: "out" for i in self.outs})
        return "(" + ", ".join(f"{names[i]} {self.shape[i]}" for i in range(len(self.shape))) + ")"


class Unsupported(Exception):
    """A weight is used in a way LoRA cannot follow; the message says how."""


@dataclasses.dataclass
class _Tag:
    """A value that is a view of weight ``wid``: ``axes[k]`` is the stored axis of axis ``k``."""

    wid: int
    axes: tuple[int, ...]


@dataclasses.dataclass
class _Use:
    kind: str  # "dot", "conv", "gather"
    contracted: tuple[int, ...] = ()  # stored axes summed with the input (dot) / window (conv)
    batch: tuple[int, ...] = ()  # stored axes that are dot_general batch axes
    free: tuple[int, ...] = ()  # stored axes that reach the output


def _inner(eqn) -> Any | None:
    name = eqn.primitive.name
    key = _CALLS.get(name) or _CUSTOM.get(name)
    if key and key in eqn.params:
        return eqn.params[key]
    if name in _REMAT and "jaxpr" in eqn.params:
        return eqn.params["jaxpr"]
    return None


def _jaxpr_consts(inner) -> tuple[Any, list]:
    if isinstance(inner, jcore.ClosedJaxpr):
        return inner.jaxpr, list(inner.consts)
    return inner, []


def _view(eqn, tag: _Tag) -> _Tag | None:
    """The tag of a pure view op's output, or None if the op is not a view we follow."""
    name = eqn.primitive.name
    if name in _PASS:
        return tag
    if name == "transpose":
        return _Tag(tag.wid, tuple(tag.axes[p] for p in eqn.params["permutation"]))
    if name == "reshape" and tuple(eqn.params["new_sizes"]) == tuple(eqn.invars[0].aval.shape):
        return tag
    return None


def _describe_use(eqn, pos: int, tag: _Tag) -> _Use | str:
    """A contraction use of the tagged operand ``pos`` of ``eqn``, or a reason it is not one."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        contract, batch = (lc, lb) if pos == 0 else (rc, rb)
        ndim = len(tag.axes)
        free = [d for d in range(ndim) if d not in contract and d not in batch]
        return _Use(
            "dot",
            contracted=tuple(sorted(tag.axes[d] for d in contract)),
            batch=tuple(sorted(tag.axes[d] for d in batch)),
            free=tuple(sorted(tag.axes[d] for d in free)),
        )
    if name == "conv_general_dilated":
        if pos != 1:
            return "it is the input (not the kernel) of a convolution"
        if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
            return (
                f"it is the kernel of a grouped convolution (feature_group_count="
                f"{eqn.params['feature_group_count']}, batch_group_count="
                f"{eqn.params['batch_group_count']}); LoRA supports ungrouped convolutions only"
            )
        rhs = eqn.params["dimension_numbers"].rhs_spec
        return _Use(
            "conv",
            contracted=tuple(sorted(tag.axes[d] for d in rhs[1:])),
            free=(tag.axes[rhs[0]],),
        )
    if name == "gather":
        if pos != 0:
            return "it is used as gather indices"
        dn = eqn.params["dimension_numbers"]
        sizes = eqn.params["slice_sizes"]
        shape = eqn.invars[0].aval.shape
        if dn.operand_batching_dims or tuple(dn.collapsed_slice_dims) != tuple(
            sorted(dn.start_index_map)
        ):
            return "it is gathered in a way other than whole rows (an embedding lookup)"
        rest = [d for d in range(len(shape)) if d not in dn.collapsed_slice_dims]
        if any(sizes[d] != shape[d] for d in rest) or len(rest) != 1:
            return "it is gathered in slices, not whole rows of one feature axis"
        return _Use(
            "gather",
            contracted=tuple(sorted(tag.axes[d] for d in dn.collapsed_slice_dims)),
            free=tuple(tag.axes[d] for d in rest),
        )
    return f"it goes through `{name}`, which is not a matmul, einsum, conv or row lookup"


def analyse(closed: jcore.ClosedJaxpr, weight_pos: Sequence[int]) -> list[list[_Use] | str]:
    """For each weight (jaxpr input at ``weight_pos[i]``): its contraction uses, or a reason
    (str) it cannot be adapted."""
    uses: list[list[_Use]] = [[] for _ in weight_pos]
    bad: dict[int, str] = {}

    def walk(jaxpr, tags: dict) -> None:
        for eqn in jaxpr.eqns:
            ins = [(i, tags[v]) for i, v in enumerate(eqn.invars) if _tagged(v, tags)]
            if not ins:
                continue
            inner = _inner(eqn)
            if inner is not None:
                ij, _ = _jaxpr_consts(inner)
                walk(ij, {ij.invars[i]: t for i, t in ins})
                continue
            if len(ins) == 1 and len(eqn.outvars) == 1:
                out = _view(eqn, ins[0][1])
                if out is not None:
                    tags[eqn.outvars[0]] = out
                    continue
            if len({t.wid for _, t in ins}) < len(ins) or len(ins) > 1:
                for _, t in ins:
                    bad.setdefault(t.wid, f"it meets another weight in `{eqn.primitive.name}`")
                continue
            pos, tag = ins[0]
            use = _describe_use(eqn, pos, tag)
            if isinstance(use, str):
                bad.setdefault(tag.wid, use)
            else:
                uses[tag.wid].append(use)
        for v in jaxpr.outvars:
            if _tagged(v, tags):
                bad.setdefault(tags[v].wid, "it is returned (or a view of it is) unchanged")

    jaxpr = closed.jaxpr
    walk(
        jaxpr,
        {
            jaxpr.invars[p]: _Tag(i, tuple(range(len(jaxpr.invars[p].aval.shape))))
            for i, p in enumerate(weight_pos)
        },
    )
    return [bad[i] if i in bad else uses[i] for i in range(len(weight_pos))]


def _tagged(v, tags: dict) -> bool:
    return isinstance(v, jcore.Var) and v in tags


def roles(shape: tuple[int, ...], uses: list[_Use], *, stack: bool = True) -> WeightGeometry:
    """Axis roles of a weight from its uses; raises `Unsupported` if they disagree.

    The first row lookup, else the first use, decides ``in`` (contracted / gathered axes) and
    ``out``; dot_general batch axes are ``lead``. With ``stack``, leading ``out`` axes that come
    before another ``out`` axis, ahead of every ``in`` axis, are ``lead`` too: gemma's ``kv``
    weight ``(2, K, D, H)`` or a transposed gate/up weight ``(2, H, F)`` holds two projections,
    and each gets its own adapter (as PEFT's separate ``k_proj``/``v_proj``). A weight like
    ``q`` ``(N, D, H)`` keeps ``N`` as an output axis.
    """
    first = next((u for u in uses if u.kind == "gather"), uses[0])
    lead = list(first.batch)
    ins = list(first.contracted)
    outs = [a for a in range(len(shape)) if a not in lead and a not in ins]
    if stack and ins:
        k = 0
        while k + 1 < len(outs) and outs[k + 1] < min(ins) and outs[k] == k:
            k += 1
        lead, outs = sorted(lead + outs[:k]), outs[k:]
    if not ins or not outs:
        raise Unsupported(
            f"its use contracts {'all' if not outs else 'none'} of its axes, so it has no "
            "input/output split"
        )
    geom = WeightGeometry(tuple(shape), tuple(lead), tuple(sorted(ins)), tuple(outs))
    check_uses(geom, uses)
    return geom


def check_uses(geom: WeightGeometry, uses: list[_Use]) -> None:
    """Raise `Unsupported` unless every use can run factored under ``geom``'s roles."""
    for u in uses:
        if u.kind in ("conv", "gather") and (
            set(u.contracted) != set(geom.ins) or set(u.free) != set(geom.outs)
        ):
            raise Unsupported(
                f"it is used both as a {u.kind} kernel and in other ways with different axis roles"
            )
        if not set(u.batch) <= set(geom.lead) or not set(geom.lead) <= set(u.batch + u.free):
            raise Unsupported("its stacked axes are contracted by one of its uses")


# ---------------------------------------------------------------------------------------------
# Evaluation with the branch added


@dataclasses.dataclass
class Adapter:
    """What evaluation needs for one weight: its geometry, factors and branch settings."""

    geom: WeightGeometry
    a: jax.Array  # (lead..., in..., r)
    b: jax.Array  # (lead..., r, out...)
    scale: float
    dropout: Callable[[jax.Array], jax.Array] | None = None  # x -> dropped-out x
    m: jax.Array | None = None  # DoRA's magnitude (lead..., out...), see `jax_lora.dora`


def evaluate(closed: jcore.ClosedJaxpr, args: Sequence[Any], adapters: dict[int, Adapter]):
    """Run ``closed`` on ``args`` (flat) with LoRA on the inputs ``adapters`` names (input
    position -> `Adapter`). Returns the flat outputs."""
    jaxpr = closed.jaxpr
    tags = {
        jaxpr.invars[p]: _Tag(p, tuple(range(len(jaxpr.invars[p].aval.shape)))) for p in adapters
    }
    return _eval(jaxpr, list(closed.consts), list(args), tags, adapters)


def _eval(jaxpr, consts, args, tags, adapters):
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        tagged = [(i, tags[v]) for i, v in enumerate(eqn.invars) if _tagged(v, tags)]
        inner = _inner(eqn) if tagged else None
        if inner is not None:
            ij, ic = _jaxpr_consts(inner)
            outs = _eval(ij, ic, invals, {ij.invars[i]: t for i, t in tagged}, adapters)
        else:
            params = eqn.primitive.get_bind_params(eqn.params)
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **params)
            outs = outs if eqn.primitive.multiple_results else [outs]
            if tagged:
                pos, tag = tagged[0]
                view = _view(eqn, tag) if len(eqn.outvars) == 1 else None
                if view is not None:
                    tags[eqn.outvars[0]] = view
                elif adapters[tag.wid].m is not None:
                    outs = [_dora_use(eqn, invals, pos, tag, adapters[tag.wid], outs[0])]
                else:
                    outs = [outs[0] + _branch(eqn, invals, pos, tag, adapters[tag.wid], outs[0])]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def _dora_use(eqn, invals, pos: int, tag: _Tag, ad: Adapter, y: jax.Array) -> jax.Array:
    """DoRA at one use (`jax_lora.dora.use_output`): the use's output scaled per output feature
    by ``m/‖W + s·a@b‖``; while dropout runs, the base part is the op on the dropped-out input."""
    from . import dora

    geom, name = ad.geom, eqn.primitive.name
    base = y
    if ad.dropout is not None and name != "gather":  # PEFT's Embedding has no LoRA dropout
        invals = list(invals)
        invals[1 - pos] = ad.dropout(invals[1 - pos])
        ad = dataclasses.replace(ad, dropout=None)
        base = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    lora = _branch(eqn, invals, pos, tag, ad, y)
    view_out = _output_axes(eqn, pos, tag)  # view axis of the weight -> axis of y
    stored_out = {tag.axes[d]: o for d, o in view_out.items()}
    out_axes = tuple(stored_out[i] for i in geom.lead + geom.outs)
    kernel = jnp.transpose(invals[pos], tuple(int(i) for i in np.argsort(tag.axes)))
    return dora.use_output(y, base, lora, kernel, ad.a, ad.b, ad.m, ad.scale, geom, out_axes)


def _output_axes(eqn, pos: int, tag: _Tag) -> dict[int, int]:
    """For the weight operand ``pos`` of a use: its (view) axes that reach the output, and where."""
    name = eqn.primitive.name
    if name == "conv_general_dilated":
        dn = eqn.params["dimension_numbers"]
        return {dn.rhs_spec[0]: dn.out_spec[1]}
    if name == "gather":
        dn = eqn.params["dimension_numbers"]
        rest = [d for d in range(len(tag.axes)) if d not in dn.collapsed_slice_dims]
        return dict(zip(rest, dn.offset_dims, strict=True))
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    nd = [len(v.aval.shape) for v in eqn.invars[:2]]
    free = [
        [d for d in range(nd[i]) if d not in (lc, rc)[i] and d not in (lb, rb)[i]] for i in (0, 1)
    ]
    out = {d: k for k, d in enumerate((lb, rb)[pos])}
    start = len(lb) + (0 if pos == 0 else len(free[0]))
    out.update({d: start + k for k, d in enumerate(free[pos])})
    return out


def _letters(n: int, avoid: str = "") -> list[str]:
    pool = [c for c in string.ascii_letters if c not in avoid]
    if n > len(pool):
        raise Unsupported("too many axes")
    return pool[:n]


def _branch(eqn, invals, pos: int, tag: _Tag, ad: Adapter, y: jax.Array) -> jax.Array:
    name = eqn.primitive.name
    geom = ad.geom
    if name == "dot_general":
        return _dot_branch(eqn, invals, pos, tag, ad, y)
    x = invals[1 - pos]
    if name == "conv_general_dilated":
        x = ad.dropout(x) if ad.dropout is not None else x
        dn = eqn.params["dimension_numbers"]
        a = _factor_view(ad.a.astype(x.dtype), geom, tag.axes, dn.rhs_spec[0])
        h = eqn.primitive.bind(x, a, **eqn.primitive.get_bind_params(eqn.params))
        h = h * jnp.asarray(ad.scale, h.dtype)
        return _apply_b(h, ad.b.astype(h.dtype), dn.out_spec[1], eqn).astype(y.dtype)
    # gather: a row lookup of ``a``, then ``b``
    dn = eqn.params["dimension_numbers"]
    out_axis = next(d for d in range(len(tag.axes)) if d not in dn.collapsed_slice_dims)
    a = _factor_view(ad.a.astype(y.dtype), geom, tag.axes, out_axis)
    sizes = list(eqn.params["slice_sizes"])
    sizes[out_axis] = a.shape[out_axis]
    params = dict(eqn.primitive.get_bind_params(eqn.params), slice_sizes=tuple(sizes))
    h = eqn.primitive.bind(a, invals[1], **params)
    h = h * jnp.asarray(ad.scale, h.dtype)
    return _apply_b(h, ad.b.astype(h.dtype), dn.offset_dims[0], eqn).astype(y.dtype)


def _factor_view(a: jax.Array, geom: WeightGeometry, view_axes, out_axis: int) -> jax.Array:
    """``a: (in..., r)`` laid out like the weight's current view, with the view's single
    ``out`` axis (``out_axis``) replaced by the rank axis."""
    stored_of_a = list(geom.lead + geom.ins)
    order = [
        len(stored_of_a) if d == out_axis else stored_of_a.index(view_axes[d])
        for d in range(len(view_axes))
    ]
    return jnp.transpose(a, order)


def _apply_b(h: jax.Array, b: jax.Array, axis: int, eqn) -> jax.Array:
    """Contract ``h``'s rank axis (at ``axis``) with ``b: (r, out)``; the result's ``out`` axis
    takes the rank axis's place."""
    h = jnp.moveaxis(h, axis, -1)
    y = lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.DEFAULT)
    return jnp.moveaxis(y, -1, axis)


def _dot_branch(eqn, invals, pos: int, tag: _Tag, ad: Adapter, y: jax.Array) -> jax.Array:
    geom = ad.geom
    x = invals[1 - pos]
    if ad.dropout is not None:
        x = ad.dropout(x)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_contract, x_contract = (lc, rc) if pos == 0 else (rc, lc)
    w_batch, x_batch = (lb, rb) if pos == 0 else (rb, lb)
    n = len(geom.shape)
    letters = _letters(n + x.ndim + 1)
    w_letter = letters[:n]  # by stored axis
    r = letters[n]
    fresh = iter(letters[n + 1 :])
    x_spec = [""] * x.ndim
    for xd, wd in zip(x_contract, w_contract, strict=True):
        x_spec[xd] = w_letter[tag.axes[wd]]
    for xd, wd in zip(x_batch, w_batch, strict=True):
        x_spec[xd] = w_letter[tag.axes[wd]]
    for d in range(x.ndim):
        if not x_spec[d]:
            x_spec[d] = next(fresh)
    w_free = [d for d in range(len(tag.axes)) if d not in w_contract and d not in w_batch]
    x_free = [d for d in range(x.ndim) if d not in x_contract and d not in x_batch]
    if not x_batch and len(x_free) > 1 and x_free == list(range(x_free[0], x_free[-1] + 1)):
        # x's free axes (batch, sequence) as one: 2-D matmuls, as in `factors.branch` (XLA:CPU
        # runs the gradient `x.T @ dh` over a 3-D x several times slower)
        f0, nf = x_free[0], len(x_free)
        x = x.reshape(x.shape[:f0] + (math.prod(x.shape[f0 : f0 + nf]),) + x.shape[f0 + nf :])
        x_spec = x_spec[: f0 + 1] + x_spec[f0 + nf :]
        x_free = [f0]
    batch = [x_spec[d] for d in x_batch]
    w_out = [w_letter[tag.axes[d]] for d in w_free]
    x_out = [x_spec[d] for d in x_free]
    out_spec = batch + (w_out + x_out if pos == 0 else x_out + w_out)
    a_spec = [w_letter[i] for i in geom.lead + geom.ins] + [r]
    b_spec = [w_letter[i] for i in geom.lead] + [r] + [w_letter[i] for i in geom.outs]
    contracted = {w_letter[tag.axes[d]] for d in w_contract}
    first, second = (a_spec, b_spec), (ad.a, ad.b)
    if not contracted & {w_letter[i] for i in geom.ins}:
        first, second = (b_spec, a_spec), (ad.b, ad.a)
    f_spec, s_spec = first
    f_val, s_val = (t.astype(x.dtype) for t in second)
    keep = set(out_spec) | set(s_spec)
    h_spec = [c for c in dict.fromkeys(x_spec + f_spec) if c in keep]
    prec = eqn.params.get("precision")
    h = jnp.einsum(
        f"{''.join(x_spec)},{''.join(f_spec)}->{''.join(h_spec)}", x, f_val, precision=prec
    )
    h = h * jnp.asarray(ad.scale, h.dtype)
    out = jnp.einsum(
        f"{''.join(h_spec)},{''.join(s_spec)}->{''.join(out_spec)}", h, s_val, precision=prec
    )
    return out.reshape(y.shape).astype(y.dtype)


def delta(geom: WeightGeometry, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * a @ b`` in the weight's stored layout, in fp32 (or wider)."""
    d = delta_kernel(a, b, scale, len(geom.lead) + len(geom.ins) + len(geom.outs))
    return geom.to_stored(d)


def geometry_from_shapes(
    shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...]
) -> list[WeightGeometry]:
    """Every role assignment (stored order kept within each group) under which ``a @ b`` fits a
    weight of ``shape``. More than one means the factors alone cannot say how to fold."""
    n = len(shape)
    n_lead = len(a_shape) + len(b_shape) - 2 - n
    if n_lead < 0 or a_shape[:n_lead] != b_shape[:n_lead]:
        return []
    ins_s, outs_s = a_shape[n_lead:-1], b_shape[n_lead + 1 :]
    found = []
    for lead in itertools.combinations(range(n), n_lead):
        rest = [i for i in range(n) if i not in lead]
        for ins in itertools.combinations(rest, len(ins_s)):
            outs = tuple(i for i in rest if i not in ins)
            if (
                tuple(shape[i] for i in lead) == tuple(a_shape[:n_lead])
                and tuple(shape[i] for i in ins) == tuple(ins_s)
                and tuple(shape[i] for i in outs) == tuple(outs_s)
            ):
                found.append(WeightGeometry(tuple(shape), tuple(lead), tuple(ins), outs))
    return found


def lift_consts(
    closed: jcore.ClosedJaxpr, targets: Sequence[Any]
) -> tuple[jcore.ClosedJaxpr, list[Any], list[int | None]]:
    """Make the constants of ``closed`` that *are* (by identity) one of ``targets`` into leading
    inputs (for a layer traced with its weights closed over, as an NNX module's ``__call__``).

    Returns ``(closed', lifted values, position of each target among the new inputs or None if
    the trace never reads it)``; the original inputs follow the lifted ones."""
    jaxpr = closed.jaxpr
    keep_v, keep_c, lift_v, lift_c, where = [], [], [], [], [None] * len(targets)
    for v, c in zip(jaxpr.constvars, closed.consts, strict=True):
        hit = next((i for i, t in enumerate(targets) if c is t), None)
        if hit is None or where[hit] is not None:
            keep_v.append(v)
            keep_c.append(c)
        else:
            where[hit] = len(lift_v)
            lift_v.append(v)
            lift_c.append(c)
    names = jaxpr.debug_info.arg_names  # keep the debug info (jax deprecates Jaxprs without)
    debug = jaxpr.debug_info._replace(
        arg_names=None if names is None else ("lifted",) * len(lift_v) + tuple(names)
    )
    new = jcore.Jaxpr(
        keep_v, lift_v + list(jaxpr.invars), jaxpr.outvars, jaxpr.eqns, jaxpr.effects, debug
    )
    return jcore.ClosedJaxpr(new, keep_c), lift_c, where


def decide(
    config: Any,
    wpath: str,
    kind: str,
    shape: tuple[int, ...],
    uses: Any,
    problem: str | None = None,
) -> tuple[WeightGeometry | None, str | None]:
    """Whether a targeted weight is adapted (linen and NNX apply one rule).

    Returns ``(geometry, None)`` to adapt it, ``(None, reason)`` to skip it with a reason
    worth reporting, or ``(None, None)`` to skip it silently (the call does not read it, or
    ``targets=None`` meets an embedding or convolution weight, which must be named). Raises
    when a ``targets`` pattern names this weight path and it cannot be adapted.

    ``uses`` is `analyse`'s entry for the weight; ``problem`` a reason found by the caller.
    """
    if isinstance(uses, list) and not uses:
        return None, None
    if problem is None and isinstance(uses, str):
        problem = uses
    if problem is None and config.targets is None and any(u.kind != "dot" for u in uses):
        return None, None
    geom = None
    if problem is None:
        try:
            geom = roles(shape, uses)
        except Unsupported as e:
            problem = str(e)
    if problem is not None:
        if any(re.fullmatch(p, wpath) for p in config.targets or ()):
            raise ValueError(
                f"`targets` matches the weight '{wpath}' ({kind}), but LoRA cannot adapt it: "
                f"{problem}. Add {re.escape(wpath)!r} to `exclude`, or target the layer that "
                "contracts it."
            )
        return None, problem  # matched through its module (or targets=None)
    if config.targets is None and config.rank > min(geom.fan_in, geom.fan_out):
        return None, f"rank {config.rank} > min(fan_in, fan_out)"
    return geom, None
