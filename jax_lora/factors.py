"""The LoRA math, written once for linen and NNX: factor init, the low-rank branch, delta-W.

Shapes: a kernel ``W: (in..., out...)`` gets ``a: (in..., r)`` and ``b: (r, out...)``;
stacked (scanned) or batched kernels carry the same leading axes on both factors.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .config import LoraConfig
from .trees import factor_nodes as factor_nodes

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Geometry:
    """How one layer's kernel splits into ``(lead..., in..., out...)`` and how ``x`` meets it.

    ``kind`` is ``"dense"`` (``lax.dot_general`` over ``axis`` with ``batch_dims``) or
    ``"einsum"`` (two einsums, ``x,a->h`` then ``h,b->y``).
    """

    kind: str
    lead_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axis: tuple[int, ...] = ()
    batch_dims: tuple[int, ...] = ()
    eq_a: str = ""
    eq_b: str = ""

    @property
    def a_shape(self) -> tuple[int, ...]:
        return self.lead_shape + self.in_shape

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)


def _tuple(v: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return (v,) if isinstance(v, (int, np.integer)) else tuple(v)


def dense_geometry(
    x_shape: tuple[int, ...],
    features: int | tuple[int, ...],
    axis: int | tuple[int, ...] = -1,
    batch_dims: tuple[int, ...] = (),
) -> Geometry:
    """Geometry of ``Dense``/``DenseGeneral``/``Linear``/``LinearGeneral`` applied to ``x``."""
    ndim = len(x_shape)
    axis = tuple(a % ndim for a in _tuple(axis))
    batch_dims = tuple(b % ndim for b in _tuple(batch_dims))
    return Geometry(
        kind="dense",
        lead_shape=tuple(x_shape[d] for d in batch_dims),
        in_shape=tuple(x_shape[d] for d in axis),
        out_shape=_tuple(features),
        axis=axis,
        batch_dims=batch_dims,
    )


def einsum_geometry(equation: str, kernel_shape: tuple[int, ...], path: str) -> Geometry:
    """Split ``Einsum``'s ``"x,kernel->y"`` into ``x,a->h`` and ``h,b->y``.

    Kernel letters only in ``x`` are input axes; kernel letters only in ``y`` are output axes.
    The kernel must list all input axes before all output axes (so that merging is
    ``a @ b`` reshaped); a kernel letter in both ``x`` and ``y`` (a per-slice kernel) has no
    low-rank split and is rejected.
    """
    eq = equation.replace(" ", "")
    try:
        lhs, out = eq.split("->")
        x_spec, k_spec = lhs.split(",")
    except ValueError:
        raise ValueError(
            f"Einsum at '{path}': cannot parse equation {equation!r}; expected 'x,kernel->y'."
        ) from None
    if "." in k_spec or len(k_spec) != len(kernel_shape):
        raise ValueError(
            f"Einsum at '{path}': kernel spec {k_spec!r} does not fit kernel shape {kernel_shape}."
        )
    roles = []
    for c in k_spec:
        in_x, in_y = c in x_spec, c in out
        if in_x and in_y:
            raise ValueError(
                f"Einsum at '{path}': equation {equation!r} keeps kernel axis '{c}' in both the "
                "input and the output (a per-slice kernel); LoRA cannot split it into a low-rank "
                "product. Exclude this layer or rewrite it as a DenseGeneral."
            )
        if not in_x and not in_y:
            raise ValueError(
                f"Einsum at '{path}': equation {equation!r} sums kernel axis '{c}' away; "
                "LoRA cannot adapt it."
            )
        roles.append("in" if in_x else "out")
    n_in = roles.count("in")
    if n_in == 0 or n_in == len(roles) or roles != ["in"] * n_in + ["out"] * (len(roles) - n_in):
        raise ValueError(
            f"Einsum at '{path}': equation {equation!r} has kernel axes {k_spec!r} with roles "
            f"{roles}; LoRA needs the contracted (input) axes first, then the output axes."
        )
    free = [c for c in string.ascii_letters if c not in eq]
    r = free[0]
    ins, outs = k_spec[:n_in], k_spec[n_in:]
    h_spec = "".join(c for c in x_spec if c not in ins) + r
    return Geometry(
        kind="einsum",
        lead_shape=(),
        in_shape=tuple(kernel_shape[:n_in]),
        out_shape=tuple(kernel_shape[n_in:]),
        eq_a=f"{x_spec},{ins}{r}->{h_spec}",
        eq_b=f"{h_spec},{r}{outs}->{out}",
    )


def check_rank(geom: Geometry, rank: int, path: str) -> None:
    limit = min(geom.fan_in, geom.fan_out)
    if rank > limit:
        raise ValueError(
            f"`rank`={rank} is larger than min(fan_in, fan_out)={limit} for the layer at "
            f"'{path}' (input axes {geom.in_shape}, output axes {geom.out_shape}). Use a "
            f"rank <= {limit}, or `exclude` this layer."
        )


def init_a(key: Array, geom: Geometry, config: LoraConfig) -> Array:
    """Initial ``a: (lead..., in..., rank)`` in ``config.param_dtype``."""
    shape = geom.a_shape + (config.rank,)
    dtype = config.param_dtype
    if callable(config.init):
        a = jnp.asarray(config.init(key, shape, dtype))
        if a.shape != shape:
            raise ValueError(
                f"the `init` callable {config.init!r} returned shape {a.shape}; a LoRA `a` factor "
                f"needs {shape} (lead..., in..., rank) in {np.dtype(dtype)}"
            )
        return a.astype(dtype)
    if config.init == "peft":
        bound = 1.0 / math.sqrt(geom.fan_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    std = 1.0 / config.rank if config.init == "gaussian" else 1.0
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def init_b(geom: Geometry, config: LoraConfig) -> Array:
    """Initial ``b: (lead..., rank, out...)``: zeros, so the adapted layer starts exact."""
    return jnp.zeros(geom.lead_shape + (config.rank,) + geom.out_shape, config.param_dtype)


def dropout(x: Array, rate: float, key: Array) -> Array:
    """Inverted dropout (as ``torch.nn.Dropout``): zero with prob. ``rate``, scale the rest."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def branch(x: Array, a: Array, b: Array, geom: Geometry, scale: float, precision=None) -> Array:
    """The low-rank branch ``scale * (x @ a) @ b`` in the dtype of ``x``; never forms ``a @ b``.

    ``x`` is the layer input (already dropped-out), ``a: (lead..., in..., r)``,
    ``b: (lead..., r, out...)``. Returns the layer's output shape.
    """
    a = a.astype(x.dtype)
    b = b.astype(x.dtype)
    if geom.kind == "einsum":
        h = jnp.einsum(geom.eq_a, x, a, precision=precision)
        h = h * jnp.asarray(scale, h.dtype)
        return jnp.einsum(geom.eq_b, h, b, precision=precision)
    nb, na = len(geom.batch_dims), len(geom.axis)
    if nb == 0 and geom.axis == tuple(range(x.ndim - na, x.ndim)):
        # As 2-D matmuls: XLA:CPU runs the backward's `x.T @ dh` (a contraction over batch and
        # sequence) several times slower on a 3-D `x`; flat, the LoRA step went from 1.13 to
        # 1.02 of the frozen model's step (benchmarks/run.py defaults).
        h = jnp.dot(x.reshape(-1, geom.fan_in), a.reshape(geom.fan_in, -1), precision=precision)
        h = h * jnp.asarray(scale, h.dtype)
        y = jnp.dot(h, b.reshape(h.shape[-1], geom.fan_out), precision=precision)
        return y.reshape(x.shape[: x.ndim - na] + geom.out_shape)
    h = lax.dot_general(
        x,
        a,
        ((geom.axis, tuple(range(nb, nb + na))), (geom.batch_dims, tuple(range(nb)))),
        precision=precision,
    )
    h = h * jnp.asarray(scale, h.dtype)
    lead = tuple(range(nb))
    return lax.dot_general(h, b, (((h.ndim - 1,), (nb,)), (lead, lead)), precision=precision)


def delta_kernel(a: Array, b: Array, scale: float, kernel_ndim: int) -> Array:
    """``scale * a @ b`` with the shape of the kernel, ``(lead..., in..., out...)``, in fp32.

    Leading axes shared by ``a`` and ``b`` (scanned layer stacks, ``batch_dims``) are
    batch axes; their count follows from ``kernel_ndim``.
    """
    n_lead = a.ndim + b.ndim - 2 - kernel_ndim
    # numpy's promotion: jnp's refuses bf16 + fp32 under strict dtype promotion (bf16 DoRA)
    dtype = np.promote_types(np.promote_types(a.dtype, b.dtype), np.float32)
    a, b = a.astype(dtype), b.astype(dtype)
    lead = tuple(range(n_lead))
    d = lax.dot_general(
        a, b, (((a.ndim - 1,), (n_lead,)), (lead, lead)), precision=lax.Precision.HIGHEST
    )
    return d * jnp.asarray(scale, dtype)


def fold(kernel: Array, a: Array, b: Array, scale: float) -> Array:
    """``kernel + scale * a @ b`` computed in fp32 and cast back to the kernel's dtype (merge;
    a negative ``scale`` unmerges)."""
    delta = delta_kernel(a, b, scale, kernel.ndim)
    return (kernel.astype(delta.dtype) + delta).astype(kernel.dtype)
