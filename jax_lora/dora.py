"""DoRA (Liu et al. 2024, arXiv 2402.09353; PEFT ``use_dora=True``), the math written once.

A kernel ``W: (lead..., in..., out...)`` with LoRA factors ``a: (lead..., in..., r)``,
``b: (lead..., r, out...)`` also gets a magnitude ``m: (lead..., out...)``; the layer computes
``y = m / ‖W + s·a@b‖ · (x @ W + s·(x @ a) @ b) + bias``, the norm over the input axes and, as
in PEFT (paper §4.3), a constant in backprop. Any other adapted weight (`jax_lora.weights`: Conv,
Embed, a layer's own matmul weight) follows the same rule in its stored layout (see below).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from . import factors, quant

Array = jax.Array

MAGNITUDE = "m"
"""The key of the magnitude in a factor node: ``{"a", "b", "m"}``."""


def _split(kernel_ndim: int, a: Array, b: Array) -> tuple[int, int]:
    """(number of lead axes, number of input axes) of a kernel adapted by ``a``, ``b``."""
    n_lead = a.ndim + b.ndim - 2 - kernel_ndim
    return n_lead, a.ndim - 1 - n_lead


def weight_norm(kernel: Array, a: Array, b: Array, scale: float) -> Array:
    """``‖W + scale·a@b‖`` over the input axes: ``(lead..., out...)`` in fp32, no gradient.

    Forms ``W + scale·a@b`` (as PEFT): measured on CPU (XLA, 1024x1024 and 2048x4096 kernels,
    rank 16, a DoRA layer's forward and backward), this was 10-20% faster than the factored
    form `weight_norm_factored` with the same peak temporary memory (XLA fuses the product
    into the reduction), and it has no cancellation. Nothing of it is kept for the backward:
    its inputs are ``stop_gradient``'ed.

    >>> import jax.numpy as jnp
    >>> from jax_lora import dora
    >>> w = jnp.array([[3.0, 0.0], [4.0, 1.0]])  # (in 2, out 2)
    >>> a, b = jnp.ones((2, 1)), jnp.array([[0.0, 1.0]])  # a @ b = [[0, 1], [0, 1]]
    >>> dora.weight_norm(w, a, b, 2.0)  # columns (3, 4) and (0 + 2, 1 + 2)
    Array([5.      , 3.6055512], dtype=float32)
    """
    kernel, a, b = (lax.stop_gradient(t) for t in (kernel, a, b))
    n_lead, n_in = _split(kernel.ndim, a, b)
    full = kernel.astype(jnp.float32) + factors.delta_kernel(a, b, scale, kernel.ndim)
    return jnp.sqrt(jnp.sum(jnp.square(full), axis=tuple(range(n_lead, n_lead + n_in))))


def weight_norm_factored(kernel: Array, a: Array, b: Array, scale: float) -> Array:
    """`weight_norm` without forming ``a@b``: ``‖W‖² + 2s·⟨aᵀW, b⟩ + s²·⟨(aᵀa) b, b⟩`` per
    output column (kept to compare against; see `weight_norm` for why it is not the default)."""
    kernel, a, b = (lax.stop_gradient(t) for t in (kernel, a, b))
    dtype = jnp.promote_types(kernel.dtype, jnp.float32)
    w, a, b = kernel.astype(dtype), a.astype(dtype), b.astype(dtype)
    n_lead, n_in = _split(w.ndim, a, b)
    lead = tuple(range(n_lead))
    ins = tuple(range(n_lead, n_lead + n_in))
    hi = lax.Precision.HIGHEST
    w2 = jnp.sum(jnp.square(w), axis=ins)  # (lead..., out...)
    atw = lax.dot_general(a, w, ((ins, ins), (lead, lead)), precision=hi)  # (lead..., r, out...)
    cross = jnp.sum(atw * b, axis=n_lead)
    gram = lax.dot_general(a, a, ((ins, ins), (lead, lead)), precision=hi)  # (lead..., r, r)
    gb = lax.dot_general(gram, b, (((n_lead + 1,), (n_lead,)), (lead, lead)), precision=hi)
    quad = jnp.sum(gb * b, axis=n_lead)
    s = jnp.asarray(scale, dtype)
    sq = w2 + 2 * s * cross + s * s * quad
    return jnp.sqrt(jnp.maximum(sq, jnp.zeros((), dtype)))


def init_magnitude(kernel: Array, a: Array, b: Array, scale: float, dtype=jnp.float32) -> Array:
    """PEFT's initial magnitude ``‖W + scale·a@b‖`` (``‖W‖`` while ``b = 0``) in ``dtype``."""
    return weight_norm(kernel, a, b, scale).astype(dtype)


def _out_factor(f: Array, y_ndim: int, geom: factors.Geometry) -> Array:
    """Reshape a per-output factor ``(lead..., out...)`` to broadcast against the layer output."""
    if geom.kind == "einsum":
        lhs, out = geom.eq_b.split("->")
        outs = lhs.split(",")[1][1:]
        order = [c for c in out if c in outs]
        f = jnp.transpose(f, [outs.index(c) for c in order])
        shape = [f.shape[order.index(c)] if c in outs else 1 for c in out]
        return f.reshape(shape)
    return bias_shaped(f, y_ndim, geom)


def bias_shaped(f: Array, y_ndim: int, geom: factors.Geometry) -> Array:
    """Reshape ``f`` stored as the layer's bias is (output axes in output order) to broadcast
    against the output."""
    if geom.kind == "einsum":
        lhs, out = geom.eq_b.split("->")
        outs = lhs.split(",")[1][1:]
        return f.reshape(
            [f.shape[[c for c in out if c in outs].index(c)] if c in outs else 1 for c in out]
        )
    n_lead, n_out = len(geom.lead_shape), len(geom.out_shape)
    rest = y_ndim - n_lead - n_out
    return f.reshape(f.shape[:n_lead] + (1,) * rest + f.shape[n_lead:])


def apply(
    y: Array,
    bias: Array | None,
    x: Array,
    x_base: Array | None,
    kernel: Array,
    a: Array,
    b: Array,
    m: Array,
    geom: factors.Geometry,
    scale: float,
    precision=None,
) -> Array:
    """A Dense-family layer's DoRA output, as PEFT's ``DoraLinearVariant.forward``.

    Args:
      y: the base layer's output ``x @ W + bias``.
      bias: the layer's bias (``None`` if it has none), broadcastable to ``y``.
      x: the LoRA branch input (dropped-out while LoRA dropout runs).
      x_base: ``dropout(x) @ W`` (no bias) while dropout runs, else ``None``: PEFT then scales
        ``x @ W`` by ``m/‖·‖ - 1`` on the dropped-out input, the base output unchanged.
      kernel, a, b, m: ``W: (lead..., in..., out...)``, the factors and ``m: (lead..., out...)``.

    Returns ``y + (m/n - 1) * base + (m/n) * s * (x @ a) @ b``, ``n`` the stop-gradient norm.
    """
    norm = weight_norm(kernel, a, b, scale)
    mn = (m.astype(norm.dtype) / norm).astype(y.dtype)
    mn = _out_factor(mn, y.ndim, geom)
    lora = factors.branch(x, a, b, geom, scale, precision)
    if x_base is None:
        base = y if bias is None else y - bias_shaped(bias.astype(y.dtype), y.ndim, geom)
    else:
        base = x_base
    return y + (mn - jnp.ones((), y.dtype)) * base + mn * lora


def apply_on(
    y: Array,
    bias: Array | None,
    x: Array,
    dropped: bool,
    kernel: Any,
    a: Array,
    b: Array,
    m: Array,
    geom: factors.Geometry,
    scale: float,
    precision=None,
) -> Array:
    """`apply` with ``x_base = base_matmul(x, kernel)`` while dropout runs (``dropped``). A
    `QArray` kernel (QLoRA + DoRA) is dequantized inside `quant.dequantized_evaluate`: the
    backward pass recomputes it and the norm, so no fp32 kernel is kept per layer."""

    def run(values, t):
        (w,), (y, bias, x, a, b, m) = values, t
        x_base = base_matmul(x, w, geom, precision) if dropped else None
        return apply(y, bias, x, x_base, w, a, b, m, geom, scale, precision)

    args = (y, bias, x, a, b, m)
    if not quant.is_quantized(kernel):
        return run([kernel], args)
    return quant.dequantized_evaluate(run, [quant._plain(kernel)], args, quant.input_marker(x))


def base_matmul(x: Array, kernel: Array, geom: factors.Geometry, precision=None) -> Array:
    """``x @ W`` without bias, contracted as the layer does (the base part of PEFT's DoRA
    forward while dropout runs)."""
    kernel = kernel.astype(x.dtype)
    if geom.kind == "einsum":
        lhs, out = geom.eq_b.split("->")
        outs = lhs.split(",")[1][1:]
        x_spec, rest = geom.eq_a.split("->")[0].split(",")
        return jnp.einsum(f"{x_spec},{rest[:-1]}{outs}->{out}", x, kernel, precision=precision)
    nb, na = len(geom.batch_dims), len(geom.axis)
    dims = ((geom.axis, tuple(range(nb, nb + na))), (geom.batch_dims, tuple(range(nb))))
    return lax.dot_general(x, kernel, dims, precision=precision)


def _kernel_factor(f: Array, n_lead: int, n_in: int) -> Array:
    """A per-output factor ``(lead..., out...)`` shaped to broadcast against the kernel."""
    return f.reshape(f.shape[:n_lead] + (1,) * n_in + f.shape[n_lead:])


def merge_kernel(kernel: Array, a: Array, b: Array, m: Array, scale: float) -> Array:
    """``m / ‖W + s·a@b‖ · (W + s·a@b)`` computed in fp32, cast to the kernel's dtype."""
    n_lead, n_in = _split(kernel.ndim, a, b)
    full = kernel.astype(jnp.float32) + factors.delta_kernel(a, b, scale, kernel.ndim)
    norm = jnp.sqrt(jnp.sum(jnp.square(full), axis=tuple(range(n_lead, n_lead + n_in))))
    f = _kernel_factor(m.astype(jnp.float32) / norm, n_lead, n_in)
    return (f * full).astype(kernel.dtype)


def unmerge_kernel(merged: Array, a: Array, b: Array, m: Array, norm: Array, scale: float) -> Array:
    """The inverse of `merge_kernel`: ``W = W' · norm / m - s·a@b``. ``norm`` is the
    `weight_norm` of the *unmerged* kernel: merged weights alone do not determine it (every
    column's scale is free), so PEFT caches it; here it comes from the unmerged model."""
    n_lead, n_in = _split(merged.ndim, a, b)
    f = _kernel_factor(norm / m.astype(jnp.float32), n_lead, n_in)
    d = factors.delta_kernel(a, b, scale, merged.ndim)
    return (merged.astype(jnp.float32) * f - d).astype(merged.dtype)


def fold(kernel: Array, node, scale: float, geom, where: str) -> Array:
    """`merge`'s DoRA case for the factor node ``{"a", "b", "m"}`` at ``where`` (``geom``: the
    weight's roles, `weights.WeightGeometry`); a negative ``scale`` (unmerge) raises: the merged
    kernel alone does not determine ``‖W + s·a@b‖``."""
    if scale < 0:
        raise ValueError(
            f"the `lora` node at '{where}' is DoRA (has a magnitude 'm'): its merge "
            "m·(W+ΔW)/‖W+ΔW‖ cannot be undone from the merged kernel and the factors alone (each "
            "output column's norm is lost). Keep the unmerged params (merge from them for export), "
            "or use `jax_lora.dora.unmerge_kernel` with the norm of the unmerged kernel."
        )
    want = tuple(geom.shape[i] for i in geom.lead + geom.outs)
    if tuple(jnp.shape(node[MAGNITUDE])) != want:
        raise ValueError(
            f"the DoRA magnitude 'm' at '{where}' has shape {tuple(jnp.shape(node[MAGNITUDE]))}, "
            f"but the weight {geom.describe()} needs (lead..., out...) = {want}"
        )
    return merge_stored(kernel, node["a"], node["b"], node[MAGNITUDE], scale, geom)


def magnitude_shape(geom: factors.Geometry) -> tuple[int, ...]:
    """``(lead..., out...)``: one magnitude per output feature (per stacked layer)."""
    return geom.lead_shape + geom.out_shape


def check_agrees(has_m: bool, use_dora: bool, path: str) -> None:
    """Raise unless a factor node has a magnitude exactly when the config says DoRA."""
    if has_m and not use_dora:
        raise ValueError(
            f"the `lora` node at '{path}' has a DoRA magnitude 'm', but `use_dora` is False: "
            "use the config the adapter was made with (`LoraConfig(..., use_dora=True)`)"
        )
    if use_dora and not has_m:
        raise ValueError(
            f"the `lora` node at '{path}' has no DoRA magnitude 'm', but the config has "
            "`use_dora=True`: these factors are plain LoRA (use `use_dora=False`), or create "
            "DoRA ones with `init` / `jax_lora.init_lora`"
        )


# ---------------------------------------------------------------------------------------------
# Any weight (`jax_lora.weights`): Conv, Embed, a (out, in) / (in, out) matmul weight, ...
#
# A weight ``W`` stored in any axis order, with roles ``geom`` (`weights.WeightGeometry`:
# ``lead``/``ins``/``outs`` stored-axis indices), factors ``a: (lead..., in..., r)``,
# ``b: (lead..., r, out...)`` and ``m: (lead..., out...)`` (each group in stored order). PEFT's
# kinds are all this one rule: Conv (``‖·‖`` over all but the out-channel axis, `_DoraConvNdLayer`),
# Embedding (per embedding dim over the vocabulary, `DoraEmbeddingLayer`, fan_in_fan_out=True)
# and GPT-2's Conv1D (`DoraLinearLayer` with fan_in_fan_out): the norm over the ``in`` axes.


def _standard(kernel: Array, geom) -> Array:
    """A stored weight as ``(lead..., in..., out...)``."""
    return jnp.transpose(kernel, geom.lead + geom.ins + geom.outs)


def weight_norm_stored(kernel: Array, a: Array, b: Array, scale: float, geom) -> Array:
    """`weight_norm` of a weight stored in any order (roles ``geom``): ``(lead..., out...)``.

    >>> import jax.numpy as jnp
    >>> from jax_lora import dora, weights
    >>> g = weights.WeightGeometry((2, 2), lead=(), ins=(1,), outs=(0,))  # (out, in)
    >>> w = jnp.array([[3.0, 4.0], [0.0, 1.0]])
    >>> dora.weight_norm_stored(w, jnp.zeros((2, 1)), jnp.zeros((1, 2)), 1.0, g)
    Array([5., 1.], dtype=float32)
    """
    return weight_norm(_standard(kernel, geom), a, b, scale)


def merge_stored(kernel: Array, a: Array, b: Array, m: Array, scale: float, geom) -> Array:
    """`merge_kernel` of a weight stored in any order: ``m/‖W + s·a@b‖ · (W + s·a@b)``."""
    return geom.to_stored(merge_kernel(_standard(kernel, geom), a, b, m, scale))


def check_uses(geom, uses, path: str) -> None:
    """Raise unless each use of a weight keeps its ``out`` (and ``lead``) axes in the output, so
    that DoRA's per-output factor ``m/‖·‖`` scales that output. ``nn.Embed.attend`` (a tied
    output head) contracts the embedding's feature axis: DoRA does not cover it (nor does PEFT,
    whose tied head is a separate Linear)."""
    for u in uses:
        if not set(geom.outs) <= set(u.free) or not set(geom.lead) <= set(u.free + u.batch):
            raise ValueError(
                f"DoRA is not supported for the weight at '{path}' where it is used with its "
                f"output axes contracted ({u.kind}, roles {geom.describe()}; e.g. `Embed.attend`, "
                "a tied output head): DoRA's magnitude scales a layer's outputs. Leave this call "
                "out (untie the head), or use plain LoRA (`use_dora=False`)."
            )


def use_output(
    y: Array,
    base: Array,
    lora: Array,
    kernel: Array,
    a: Array,
    b: Array,
    m: Array,
    scale: float,
    geom,
    out_axes: tuple[int, ...],
) -> Array:
    """DoRA at one use of a weight, as PEFT's Conv/Embedding/Linear variants:
    ``y + (m/n - 1)·base + (m/n)·lora``.

    Args:
      y: the use's output ``op(x, W)`` (no bias: the bias is a later op in the trace).
      base: ``op(dropout(x), W)`` while LoRA dropout runs (PEFT's conv/linear dropout case), else
        ``y`` itself; for a lookup ``y`` (PEFT's Embedding: ``(m/n)·(E[ids] + lora)``).
      lora: ``scale·(x @ a) @ b`` at this use (on the dropped-out input).
      kernel: ``W`` in its stored layout (a view with stored axis order); ``m: (lead..., out...)``.
      out_axes: for each of ``geom.lead + geom.outs``, its axis in ``y``.
    """
    norm = weight_norm_stored(kernel, a, b, scale, geom)
    mn = (m.astype(norm.dtype) / norm).astype(y.dtype)  # (lead..., out...)
    order = sorted(range(len(out_axes)), key=lambda k: out_axes[k])
    mn = jnp.transpose(mn, order)
    shape = [1] * y.ndim
    for k in order:
        shape[out_axes[k]] = y.shape[out_axes[k]]
    mn = mn.reshape(shape)
    return y + (mn - jnp.ones((), y.dtype)) * base + mn * lora
