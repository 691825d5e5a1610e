"""A frozen base kept quantized (QLoRA, arXiv 2305.14314): `QArray`, `quantize`, `dequantize`.

A quantized kernel is a `QArray` pytree that sits in the ``params`` tree in place of the
kernel. Its blocks run along one axis of the kernel (the contraction axis, ``axis=-2`` for a
``Dense`` kernel ``(in, out)`` and for a scanned stack ``(layers, in, out)``), and every array
in it keeps the kernel's other axes in place, so ``nn.scan`` and sharding slice it like the
kernel. The layers dequantize it on the fly (`jax_lora.linen` runs a layer holding a `QArray`
under `jax.checkpoint`, so the backward pass recomputes the dequantization instead of keeping
a full-precision kernel alive).

qtypes (``b`` = the block size, ``n`` = the size of ``axis``):

- ``nf4``: bitsandbytes' NF4 table, block-wise absmax (``b`` = 64); two codes per byte, the
  first of each pair in the high nibble (as ``bitsandbytes.functional.quantize_4bit``).
  ``double_quant=True`` stores the fp32 block scales as 8-bit codes of bitsandbytes' dynamic
  map in blocks of 256, minus their mean (paper §3 "Double Quantization").
- ``int4``: symmetric block absmax, ``round(7 w / absmax)`` in ``[-7, 7]``, packed like nf4.
- ``int8``: symmetric per output channel (one scale per slice along ``axis``).
- ``fp8``: ``float8_e4m3fn`` per output channel, scale ``absmax / 448``.
- ``q4_0``, ``q4_1``, ``q8_0``: GGUF's blocks of 32 (fp16 scales, q4_1 with fp16 minima),
  decoded with the same fp32 operations as ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from flax.core import meta

from .trees import keypath_str

# bitsandbytes `backends/utils.py` `_NF4_QUANT_TABLE` (= `functional.get_4bit_type("nf4")`), the
# NF4 levels of arXiv 2305.14314 Appendix E: quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero.
NF4_TABLE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)

QTYPES = ("nf4", "int4", "int8", "fp8", "q4_0", "q4_1", "q8_0")
DEFAULT_BLOCK = {"nf4": 64, "int4": 64, "q4_0": 32, "q4_1": 32, "q8_0": 32}
DOUBLE_QUANT_BLOCK = 256  # bitsandbytes `quantize_4bit(compress_statistics=True)`
_PACKED = ("nf4", "int4", "q4_0", "q4_1")
_PER_CHANNEL = ("int8", "fp8")
_FP8_MAX = 448.0


# bitsandbytes' signed 8-bit dynamic map (`functional.create_dynamic_map()`, sorted; arXiv
# 1511.04561), the code of the double-quantized block scales. Stored bit for bit (little-endian
# float32): the recipe rounds through `torch.linspace`, which numpy does not reproduce exactly.
_DYNAMIC_MAP_HEX = (
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf"
    "9a9956bf000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf"
    "00002fbf66662bbfcdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf"
    "666607bfcccc03bf333300bf3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be"
    "9a99bfbe6666b8be3333b1be0000aabecccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbe"
    "cdcc60be666652be000044be9a9935be333327becdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd"
    "6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd"
    "7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bda3702dbd85eb21bd676616bd48e10abd"
    "52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc643b1fbc180416bccdcc0cbc"
    "819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb5c8f42bb2db21dbb"
    "fca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b94b1fbab8"
    "b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a"
    "9defa73afca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b"
    "6abcf43b8195033ccdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c"
    "15aee73c52b8fe3c48e10a3d6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d"
    "5d8f723d7b147e3dcdcc843d5d8f8a3deb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23d"
    "d7a3b83d6766be3df728c43d85ebc93d3433db3d0000f83d66660a3ecdcc183e3333273e9a99353e0000443e"
    "6666523ecdcc603e33336f3e99997d3e0000863e34338d3e6666943e9a999b3ecccca23e0000aa3e3333b13e"
    "6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33eccccea3e0000f23e3233f93e3333003f"
    "cccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f9a99203f3433243fcdcc273f"
    "66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483fcdcc4b3f66664f3f"
    "0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f0000773f"
    "9a997a3f33337e3f0000803f"
)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' dynamic map: ``(256,)`` float32, sorted, from -0.99297 to 1."""
    return np.frombuffer(bytes.fromhex(_DYNAMIC_MAP_HEX), "<f4").astype(np.float32)


@struct.dataclass
class QArray:
    """A quantized kernel. ``shape`` = ``codes.shape`` with ``axis`` restored to full size.

    Leaves (``k`` = the kernel's shape, ``nb = k[axis] // block``):

    - ``codes``: ``uint8`` with ``k[axis] // 2`` along ``axis`` (4-bit qtypes), ``int8``
      (int8, q8_0) or ``float8_e4m3fn`` (fp8) of shape ``k``.
    - ``scales``: ``nb`` along ``axis`` (1 for the per-channel qtypes), float32 (float16 for
      GGUF); with double quantization ``uint8`` codes laid out as ``(*rest, k[-1] * nb)`` (the
      last other axis and the block axis, flattened, see `_dq_layout`).
    - ``mins``: q4_1's block minima (same layout as ``scales``), else ``None``.
    - ``scales_scale`` ``(*rest, ceil(k[-1] * nb / 256))`` and ``scales_offset`` ``(*rest,)``:
      the double quantization's block absmax and mean, else ``None``.

    Static: ``qtype``, ``block``, ``axis`` (negative, so leading axes can be sliced off by
    ``nn.scan``), ``dtype`` (what `dequantize` returns).
    """

    codes: jax.Array
    scales: jax.Array
    mins: jax.Array | None = None
    scales_scale: jax.Array | None = None
    scales_offset: jax.Array | None = None
    qtype: str = struct.field(pytree_node=False, default="nf4")
    block: int = struct.field(pytree_node=False, default=64)
    axis: int = struct.field(pytree_node=False, default=-2)
    dtype: Any = struct.field(pytree_node=False, default=np.dtype(np.float32))

    @property
    def shape(self) -> tuple[int, ...]:
        s = list(np.shape(_unbox_leaf(self.codes)))
        if self.qtype in _PACKED:
            s[self.axis] *= 2
        return tuple(s)

    @property
    def ndim(self) -> int:
        return len(np.shape(_unbox_leaf(self.codes)))

    @property
    def nbytes(self) -> int:
        """Bytes stored (codes and every scale)."""
        leaves = [_unbox_leaf(x) for x in self._leaves()]
        return sum(int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize for x in leaves)

    def _leaves(self) -> list[Any]:
        return [x for x in (self.codes, self.scales, self.mins, self.scales_scale,
                            self.scales_offset) if x is not None]  # fmt: skip

    def __repr__(self) -> str:
        if not all(hasattr(_unbox_leaf(x), "dtype") for x in self._leaves()):  # e.g. of specs
            inner = ", ".join(
                f"{f}={getattr(self, f)!r}" for f in _FIELDS if getattr(self, f) is not None
            )
            return f"QArray({self.qtype}, {inner})"
        dq = ", double_quant" if self.scales_offset is not None else ""
        return (
            f"QArray({self.qtype}, shape={self.shape}, block={self.block}, axis={self.axis}"
            f"{dq}, dtype={np.dtype(self.dtype).name})"
        )


def _unbox_leaf(x: Any) -> Any:
    """A partitioning box's value (`quantize` of a boxed tree boxes each array of a QArray)."""
    return x.value if isinstance(x, meta.AxisMetadata) else x


def _plain(q: QArray) -> QArray:
    """``q`` with its arrays out of their partitioning boxes (no sharding constraint)."""
    return jax.tree.map(_unbox_leaf, q, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def is_quantized(x: Any) -> bool:
    return isinstance(x, QArray)


def has_quantized(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a `QArray`."""
    return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


# ---------------------------------------------------------------------------- block helpers


def _blocked(x: jax.Array, axis: int, block: int) -> jax.Array:
    """``(..., n, ...) -> (..., n // block, block, ...)`` along ``axis`` (negative)."""
    ax = x.ndim + axis
    return x.reshape(x.shape[:ax] + (x.shape[ax] // block, block) + x.shape[ax + 1 :])


def _unblocked(x: jax.Array, axis: int) -> jax.Array:
    """The inverse of `_blocked` (``axis`` counted on the unblocked array)."""
    ax = x.ndim - 1 + axis
    return x.reshape(x.shape[:ax] + (x.shape[ax] * x.shape[ax + 1],) + x.shape[ax + 2 :])


def _pack(q: jax.Array, axis: int) -> jax.Array:
    """4-bit codes ``(..., n, ...)`` -> bytes ``(..., n // 2, ...)``; element ``2i`` in the high
    nibble (bitsandbytes' order)."""
    pairs = _blocked(q.astype(jnp.uint8), axis, 2)
    ax = pairs.ndim + axis  # the pair axis
    hi = jax.lax.index_in_dim(pairs, 0, ax, keepdims=False)
    lo = jax.lax.index_in_dim(pairs, 1, ax, keepdims=False)
    return (hi << jnp.uint8(4)) | lo


def _unpack(codes: jax.Array, axis: int) -> jax.Array:
    """The inverse of `_pack`: bytes -> 4-bit codes (uint8), twice as long along ``axis``."""
    ax = codes.ndim + axis
    both = jnp.stack([codes >> jnp.uint8(4), codes & jnp.uint8(15)], axis=ax + 1)
    return both.reshape(both.shape[:ax] + (both.shape[ax] * 2,) + both.shape[ax + 2 :])


def _nearest(values: jax.Array, table: np.ndarray) -> jax.Array:
    """Index of the nearest entry of the sorted ``table`` (ties to the lower one, as
    bitsandbytes' ``torch.bucketize(x, midpoints)``)."""
    mid = jnp.asarray((table[:-1] + table[1:]) / np.float32(2.0))
    return jnp.searchsorted(mid, values, side="left", method="compare_all").astype(jnp.uint8)


def _absmax_scaled(blocks: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Block absmax (over the block axis, the one after ``axis``) and ``blocks / absmax``
    clamped to [-1, 1], computed as bitsandbytes does (times the fp32 reciprocal)."""
    bax = blocks.ndim + axis
    absmax = jnp.max(jnp.abs(blocks), axis=bax)
    # an absmax above 2**126 has a subnormal reciprocal, which XLA:CPU flushes to zero: such
    # blocks are scaled by 1/4 first, on both sides (exact; not a constant, which XLA would
    # fold into the reciprocal), as `_scaled_np`
    s = jnp.where(absmax > jnp.float32(2.0**126), jnp.float32(0.25), jnp.float32(1.0))
    inv = jnp.float32(1.0) / jnp.maximum(absmax * s, jnp.float32(1e-38))
    scaled = (blocks * jnp.expand_dims(s, bax)) * jnp.expand_dims(inv, bax)
    return absmax, jnp.clip(scaled, -1.0, 1.0)


# ---------------------------------------------------------------------- double quantization


def _dq_layout(scales: jax.Array, axis: int) -> jax.Array:
    """Block scales with the block axis moved last and flattened with the axis before it:
    ``(*rest, m)``. For a Dense kernel ``(in, out)`` this is bitsandbytes' order of the absmax
    of ``W.T`` (row-major over ``(out, in // block)``)."""
    moved = jnp.moveaxis(scales, scales.ndim + axis, -1)
    return moved.reshape(moved.shape[:-2] + (moved.shape[-2] * moved.shape[-1],))


def _dq_unlayout(flat: jax.Array, like_shape: tuple[int, ...], axis: int) -> jax.Array:
    moved_shape = list(like_shape)
    ax = len(like_shape) + axis
    n_blocks = moved_shape.pop(ax)
    moved = flat.reshape(tuple(moved_shape) + (n_blocks,))
    return jnp.moveaxis(moved, -1, ax)


def _double_quantize(scales: jax.Array, axis: int):
    flat = _dq_layout(scales, axis)
    offset = jnp.mean(flat, axis=-1)
    x = flat - offset[..., None]
    m = flat.shape[-1]
    n2 = -(-m // DOUBLE_QUANT_BLOCK)
    pad = n2 * DOUBLE_QUANT_BLOCK - m
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])  # zeros: the absmax is unchanged
    absmax2, scaled = _absmax_scaled(_blocked(xp, -1, DOUBLE_QUANT_BLOCK), -1)
    q = _nearest(scaled, dynamic_map())
    q = q.reshape(xp.shape)[..., :m]
    return q, absmax2, offset


def _double_dequantize(q: QArray) -> jax.Array:
    scales_q, absmax2 = q.scales, q.scales_scale
    m = scales_q.shape[-1]
    n2 = absmax2.shape[-1]
    vals = jnp.asarray(dynamic_map())[scales_q.astype(jnp.int32)]
    vals = jnp.pad(vals, [(0, 0)] * (vals.ndim - 1) + [(0, n2 * DOUBLE_QUANT_BLOCK - m)])
    vals = _blocked(vals, -1, DOUBLE_QUANT_BLOCK) * absmax2[..., None]
    flat = vals.reshape(vals.shape[:-2] + (-1,))[..., :m] + q.scales_offset[..., None]
    shape = list(q.shape)
    shape[q.axis] //= q.block
    return _dq_unlayout(flat, tuple(shape), q.axis)


# ------------------------------------------------------------------------- one array


def quantize_array(
    w: Any,
    qtype: str,
    *,
    block: int | None = None,
    axis: int = -2,
    double_quant: bool = False,
    dtype: Any = None,
    path: str = "<array>",
) -> QArray:
    """Quantize one kernel ``w`` (any float dtype, quantized from its fp32 value).

    Args:
      w: the kernel, e.g. ``(in, out)``; blocks run along ``axis``.
      qtype: one of `QTYPES`.
      block: block size along ``axis`` (default `DEFAULT_BLOCK`; ignored by int8/fp8).
      axis: the contraction axis (negative or positive; stored negative).
      double_quant: 8-bit codes for the block scales (nf4/int4 only).
      dtype: the dtype `dequantize` returns (default: ``w``'s dtype).
      path: named in errors.

    Returns:
      A `QArray` with ``shape == w.shape``.
    """
    if qtype not in QTYPES:
        raise ValueError(f"unknown qtype {qtype!r} for '{path}'; expected one of {QTYPES}")
    if isinstance(w, QArray):
        raise ValueError(f"'{path}' is already quantized ({w!r}); dequantize it first")
    _check_options(path, block, axis, dtype)
    w_dtype = np.dtype(getattr(w, "dtype", np.float32))
    if not jnp.issubdtype(w_dtype, jnp.floating):
        raise ValueError(f"cannot quantize '{path}': dtype {w_dtype} is not a floating dtype")
    shape = tuple(np.shape(w))
    if len(shape) < 2:
        raise ValueError(f"cannot quantize '{path}' of shape {shape}: it is not a matrix")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"`axis`={axis} is out of range for '{path}' of shape {shape}")
    axis = axis - len(shape) if axis >= 0 else axis
    if double_quant and qtype not in ("nf4", "int4"):
        raise ValueError(f"`double_quant` applies to nf4/int4 block scales, not to {qtype!r}")
    block = DEFAULT_BLOCK.get(qtype, 1) if block is None else int(block)
    if qtype in ("q4_0", "q4_1", "q8_0") and block != 32:
        raise ValueError(f"GGUF {qtype} has blocks of 32, got `block`={block} for '{path}'")
    if qtype in DEFAULT_BLOCK and (block < 2 or block % 2 or shape[axis] % block):
        raise ValueError(
            f"cannot quantize '{path}' of shape {shape} as {qtype} with `block`={block}: the "
            f"block must be even and divide the contraction axis (axis {axis}, size "
            f"{shape[axis]}). Choose a block dividing {shape[axis]}, or leave this kernel out "
            "with `targets`."
        )
    out_dtype = np.dtype(w_dtype if dtype is None else dtype)
    if isinstance(w, jax.core.Tracer) and qtype in _GGUF_BYTES:  # gguf's numpy encoder
        return _quantize_gguf_traced(jnp.asarray(w, jnp.float32), qtype, axis, out_dtype, path)
    if isinstance(w, jax.core.Tracer):  # under a transformation: jax ops
        return _quantize(jnp.asarray(w, jnp.float32), qtype, block, axis, double_quant, out_dtype)
    # a concrete array: numpy (each eager jax op would compile and keep an XLA kernel per shape)
    x = np.asarray(w, np.float32)
    _check_finite(x, path)
    if qtype in ("q4_0", "q4_1", "q8_0"):
        q = _quantize_gguf(x, qtype, axis, out_dtype)
        _check_fp16_scales(q, path)
        return q
    return _quantize_np(x, qtype, block, axis, double_quant, out_dtype)


def _check_options(path: str, block: Any, axis: Any, dtype: Any) -> None:
    """`quantize_array`'s options: integers where they must be, a floating ``dtype``."""
    for name, v in (("block", block), ("axis", axis)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
            raise ValueError(f"`{name}`={v!r} for '{path}' must be an integer")
    if dtype is not None and not jnp.issubdtype(np.dtype(dtype), jnp.floating):
        raise ValueError(
            f"`dtype`={np.dtype(dtype).name} for '{path}' is not a floating dtype: it is what "
            "the layers compute with (e.g. jnp.float32 or jnp.bfloat16)"
        )


def _check_finite(x: np.ndarray, path: str) -> None:
    """A NaN/inf weight would spread over its whole block (or channel): refused. A float64
    sum first, so that a finite kernel costs no kernel-sized temporary."""
    if np.isfinite(np.sum(x, dtype=np.float64)):
        return
    bad = ~np.isfinite(x)
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"cannot quantize '{path}' of shape {x.shape}: it has {int(bad.sum())} non-finite "
        f"value(s) (the first, {x[first]}, at index {first}), which would spread over its "
        "whole quantization block; fix or leave out this weight (`targets`)"
    )


def _check_fp16_scales(q: QArray, path: str) -> None:
    """GGUF's float16 block scales (and q4_1's minima) overflow past 65504: refused."""
    for name in ("scales", "mins"):
        v = getattr(q, name)
        if v is not None and not np.isfinite(np.asarray(v)).all():
            raise ValueError(
                f"cannot quantize '{path}' as {q.qtype}: its block {name} overflow GGUF's "
                f"float16 (largest finite 65504); use nf4, int4 or int8, or rescale the weight"
            )


def _quantize_gguf_traced(
    w: jax.Array, qtype: str, axis: int, out_dtype, path: str = "<array>"
) -> QArray:
    """`_quantize_gguf` of a traced array (under ``jax.jit``, ``vmap``, ``eval_shape``): gguf's
    numpy encoder through ``jax.pure_callback``, bit for bit the concrete result, with its
    checks (NaN/inf, float16 overflow) on the host: raised when the computation runs."""
    shape = list(w.shape)
    ax = len(shape) + axis
    codes_shape, scales_shape = list(shape), list(shape)
    if qtype != "q8_0":
        codes_shape[ax] //= 2
    scales_shape[ax] //= 32
    out = [
        jax.ShapeDtypeStruct(tuple(codes_shape), np.int8 if qtype == "q8_0" else np.uint8),
        jax.ShapeDtypeStruct(tuple(scales_shape), np.float16),
    ]
    if qtype == "q4_1":
        out.append(jax.ShapeDtypeStruct(tuple(scales_shape), np.float16))

    def host(x):
        x = np.asarray(x, np.float32)
        _check_finite(x, path)
        q = _quantize_gguf(x, qtype, axis, out_dtype)
        _check_fp16_scales(q, path)
        return tuple(np.asarray(a) for a in (q.codes, q.scales, q.mins) if a is not None)

    res = jax.pure_callback(host, tuple(out), w, vmap_method="sequential")
    mins = res[2] if qtype == "q4_1" else None
    return QArray(res[0], res[1], mins, qtype=qtype, block=32, axis=axis, dtype=out_dtype)


def _quantize(x, qtype, block, axis, double_quant, out_dtype) -> QArray:
    if qtype in _PER_CHANNEL:
        absmax = jnp.max(jnp.abs(x), axis=x.ndim + axis, keepdims=True, initial=0.0)
        top = 127.0 if qtype == "int8" else _FP8_MAX
        scale = absmax / jnp.float32(top)
        safe = jnp.where(scale == 0, jnp.float32(1.0), scale)
        if qtype == "int8":
            codes = jnp.clip(jnp.round(x / safe), -127, 127).astype(jnp.int8)
        else:
            codes = jnp.clip(x / safe, -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn)
        return QArray(codes, scale, qtype=qtype, block=x.shape[axis], axis=axis, dtype=out_dtype)
    absmax, scaled = _absmax_scaled(_blocked(x, axis, block), axis)
    if qtype == "nf4":
        q = _nearest(scaled, NF4_TABLE)
    else:  # int4: symmetric levels -7..7, stored + 8
        q = (jnp.round(scaled * jnp.float32(7.0)) + jnp.float32(8.0)).astype(jnp.uint8)
    codes = _pack(_unblocked(q, axis), axis)
    if not double_quant:
        return QArray(codes, absmax, qtype=qtype, block=block, axis=axis, dtype=out_dtype)
    sq, absmax2, offset = _double_quantize(absmax, axis)
    return QArray(
        codes, sq, None, absmax2, offset, qtype=qtype, block=block, axis=axis, dtype=out_dtype
    )


def _quantize_np(x: np.ndarray, qtype, block, axis, double_quant, out_dtype) -> QArray:
    """`_quantize` in numpy, bit for bit (the same fp32 operations; no XLA kernel compiled:
    the results go to the device with `jax.device_put`, since ``jnp.asarray`` of a numpy array
    compiles a copy per shape)."""
    f32 = np.float32
    if qtype in _PER_CHANNEL:
        absmax = np.max(np.abs(x), axis=x.ndim + axis, keepdims=True, initial=np.float32(0))
        # XLA turns the division by a constant into a product with its fp32 reciprocal
        scale = absmax * (f32(1.0) / f32(127.0 if qtype == "int8" else _FP8_MAX))
        safe = np.where(scale == 0, f32(1.0), scale)
        if qtype == "int8":
            codes = np.clip(np.round(x / safe), f32(-127), f32(127)).astype(np.int8)
        else:
            codes = np.clip(x / safe, f32(-_FP8_MAX), f32(_FP8_MAX)).astype(jnp.float8_e4m3fn)
        return QArray(
            jax.device_put(codes), jax.device_put(scale), qtype=qtype, block=x.shape[axis], axis=axis,
            dtype=out_dtype,
        )  # fmt: skip
    ax = x.ndim + axis
    blocks = x.reshape(x.shape[:ax] + (x.shape[ax] // block, block) + x.shape[ax + 1 :])
    absmax = np.max(np.abs(blocks), axis=ax + 1)
    scaled = _scaled_np(blocks, absmax, ax + 1)
    del blocks
    if qtype == "nf4":
        q = _nearest_np(scaled, NF4_TABLE)
    else:  # int4: symmetric levels -7..7, stored + 8 (an all-zero block: NaN -> 0, as XLA)
        q = np.nan_to_num(np.round(scaled * f32(7.0)) + f32(8.0), nan=0.0).astype(np.uint8)
    del scaled
    pairs = q.reshape(x.shape[:ax] + (x.shape[ax] // 2, 2) + x.shape[ax + 1 :])
    hi = np.take(pairs, 0, axis=ax + 1)
    lo = np.take(pairs, 1, axis=ax + 1)
    codes = jax.device_put((hi << np.uint8(4)) | lo)
    if not double_quant:
        return QArray(
            codes, jax.device_put(absmax), qtype=qtype, block=block, axis=axis, dtype=out_dtype
        )
    sq, absmax2, offset = (jax.device_put(v) for v in _double_quantize_np(absmax, axis))
    return QArray(
        codes, sq, None, absmax2, offset, qtype=qtype, block=block, axis=axis, dtype=out_dtype
    )


def _double_quantize_np(scales: np.ndarray, axis: int):
    """`_double_quantize` in numpy, bit for bit; only the mean of the scales is jax's own
    (``jnp.mean``: XLA's float32 sum in its order, one small compiled function per shape)."""
    moved = np.moveaxis(scales, scales.ndim + axis, -1)
    flat = np.ascontiguousarray(moved.reshape(moved.shape[:-2] + (-1,)))
    offset = np.asarray(jnp.mean(jax.device_put(flat), axis=-1))
    x = flat - offset[..., None]
    m = flat.shape[-1]
    n2 = -(-m // DOUBLE_QUANT_BLOCK)
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n2 * DOUBLE_QUANT_BLOCK - m)])
    blocks = xp.reshape(xp.shape[:-1] + (n2, DOUBLE_QUANT_BLOCK))
    absmax2 = np.max(np.abs(blocks), axis=-1)
    q = _nearest_np(_scaled_np(blocks, absmax2, blocks.ndim - 1), dynamic_map())
    return q.reshape(xp.shape)[..., :m], absmax2, offset


def _scaled_np(blocks: np.ndarray, absmax: np.ndarray, bax: int) -> np.ndarray:
    """`_absmax_scaled`'s ``blocks / absmax`` in [-1, 1]. XLA:CPU flushes its float32 floor
    ``1e-38`` (a denormal) to zero, so an all-zero block divides by zero there: NaN, kept
    here (its codes then dequantize to ``code * 0 = 0`` all the same)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        big = absmax > np.float32(2.0**126)  # a subnormal reciprocal: as `_absmax_scaled`
        s = np.where(big, np.float32(0.25), np.float32(1.0)) if big.any() else None
        a = absmax if s is None else absmax * s
        inv = np.float32(1.0) / np.where(a < np.finfo(np.float32).tiny, 0, a)
        scaled = blocks if s is None else blocks * np.expand_dims(s, bax)
        scaled = scaled * np.expand_dims(inv, bax)
        return np.clip(scaled, np.float32(-1.0), np.float32(1.0))


def _nearest_np(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`_nearest` in numpy (NaN -> the last index, as XLA's)."""
    mid = (table[:-1] + table[1:]) / np.float32(2.0)
    return np.searchsorted(mid, values, side="left").astype(np.uint8)


def _block_scales(q: QArray) -> jax.Array:
    if q.scales_offset is not None:
        return _double_dequantize(q)
    return q.scales.astype(jnp.float32)


def dequantize_array(q: QArray) -> jax.Array:
    """The kernel a `QArray` stands for, ``q.shape`` in ``q.dtype`` (computed in fp32)."""
    q = _plain(q)
    axis = q.axis
    if q.qtype in _PER_CHANNEL:
        return (q.codes.astype(jnp.float32) * q.scales).astype(q.dtype)
    codes = _unpack(q.codes, axis) if q.qtype in _PACKED else q.codes
    blocks = _blocked(codes, axis, q.block)
    s = jnp.expand_dims(_block_scales(q), blocks.ndim + axis)
    if q.qtype == "nf4":
        w = jnp.asarray(NF4_TABLE)[blocks.astype(jnp.int32)] * s
    elif q.qtype == "int4":
        w = (blocks.astype(jnp.float32) - jnp.float32(8.0)) * (s / jnp.float32(7.0))
    elif q.qtype == "q4_0":  # gguf: d * (q - 8)
        w = s * (blocks.astype(jnp.int8) - jnp.int8(8)).astype(jnp.float32)
    elif q.qtype == "q4_1":  # gguf: d * q + m
        m = jnp.expand_dims(q.mins.astype(jnp.float32), blocks.ndim + axis)
        w = s * blocks.astype(jnp.float32) + m
    else:  # q8_0: x * d
        w = blocks.astype(jnp.float32) * s
    return _unblocked(w, axis).astype(q.dtype)


# ------------------------------------------------------------------------------- GGUF


_GGUF_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34}


def _gguf_type(qtype: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, qtype.upper())


def _quantize_gguf(x: np.ndarray, qtype: str, axis: int, out_dtype) -> QArray:
    """GGUF blocks via ``gguf.quants.quantize`` (its reference encoder), then `from_gguf`."""
    import gguf

    rows = np.moveaxis(x, axis, -1)  # GGUF blocks run along the last (row) axis
    raw = gguf.quants.quantize(np.ascontiguousarray(rows), _gguf_type(qtype))
    return from_gguf(raw, qtype, axis=axis, dtype=out_dtype)


def from_gguf(raw: np.ndarray, qtype: str, *, axis: int = -1, dtype: Any = np.float32) -> QArray:
    """A `QArray` from a GGUF tensor's raw blocks (``GGUFReader`` ``tensor.data``, uint8
    ``(*rows, n_bytes)``, blocks of 32 along the row), without decoding to floats.

    ``axis`` is where the row axis goes in the kernel: ``-1`` keeps the file's layout (torch
    ``(out, in)``), ``-2`` gives a flax ``Dense`` kernel ``(in, out)`` from a 2-D tensor.
    """
    if qtype not in _GGUF_BYTES:
        raise ValueError(f"unsupported GGUF type {qtype!r}; expected one of {tuple(_GGUF_BYTES)}")
    raw = np.asarray(raw)
    nbytes = _GGUF_BYTES[qtype]
    if raw.dtype != np.uint8 or raw.shape[-1] % nbytes:
        raise ValueError(
            f"GGUF {qtype} data must be uint8 with a multiple of {nbytes} bytes per row, got "
            f"{raw.dtype} {raw.shape}"
        )
    blocks = raw.reshape(raw.shape[:-1] + (raw.shape[-1] // nbytes, nbytes))
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    mins = None
    if qtype == "q4_1":
        mins = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    if qtype == "q8_0":
        codes = blocks[..., 2:].view(np.int8).reshape(raw.shape[:-1] + (-1,))
    else:  # element j in the low nibble of byte j, element j + 16 in its high nibble
        qs = blocks[..., nbytes - 16 :]
        q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)
        q = q.reshape(raw.shape[:-1] + (-1,))
        codes = (q[..., 0::2] << np.uint8(4)) | q[..., 1::2]
    if axis != -1:
        codes, d = np.moveaxis(codes, -1, axis), np.moveaxis(d, -1, axis)
        mins = None if mins is None else np.moveaxis(mins, -1, axis)
    n = np.ndim(codes)
    axis = axis - n if axis >= 0 else axis
    # `jax.device_put`: ``jnp.asarray`` of a numpy array compiles a copy for every shape
    keep = lambda a: None if a is None else jax.device_put(np.ascontiguousarray(a))  # noqa: E731
    return QArray(
        keep(codes), keep(d), keep(mins), qtype=qtype, block=32, axis=axis, dtype=np.dtype(dtype)
    )


def swap_last_axes(q: QArray) -> QArray:
    """The `QArray` of ``kernel.swapaxes(-1, -2)`` (no decoding): torch ``(out, in)`` <->
    flax ``(in, out)``."""
    if q.axis not in (-1, -2):
        raise ValueError(f"swap_last_axes needs blocks along one of the last two axes, got {q!r}")
    leaves = {k: getattr(q, k) for k in ("codes", "scales", "mins")}
    if q.scales_offset is not None:
        raise ValueError("swap_last_axes does not reorder double-quantized scales")

    def swap(v):  # a concrete array: numpy's (eager jax would compile a transpose per shape)
        if isinstance(v, jax.core.Tracer):
            return jnp.swapaxes(v, -1, -2)
        return jax.device_put(np.ascontiguousarray(np.swapaxes(np.asarray(v), -1, -2)))

    swapped = {k: None if v is None else swap(v) for k, v in leaves.items()}
    return q.replace(**swapped, axis=-3 - q.axis)


# ------------------------------------------------------------------------------- trees


def _default_target(path: str, leaf: Any) -> bool:
    return path.split("/")[-1] == "kernel" and np.ndim(leaf) >= 2


_NOT_MATRICES = ("bias", "scale")  # stacked (scanned) biases and norm scales have 2+ axes too


def _target_hit(pats: list[str] | None, path: str, leaf: Any) -> bool:
    """Whether the weight at ``path`` is quantized: the default (`_default_target`), or a
    pattern fullmatches its path (``"conv/kernel"``), or its module's path (``"conv"``: that
    module's weights with 2+ axes, biases and scales excepted)."""
    if pats is None:
        return _default_target(path, leaf)
    module, _, name = path.rpartition("/")
    matrix = bool(module) and np.ndim(leaf) >= 2 and name not in _NOT_MATRICES
    return any(re.fullmatch(p, path) or (matrix and re.fullmatch(p, module)) for p in pats)


def quantize(
    params: Any,
    qtype: str,
    *,
    targets: str | Sequence[str] | None = None,
    block: int | None = None,
    axis: int = -2,
    double_quant: bool = False,
    dtype: Any = None,
    mesh: Any = None,
) -> Any:
    """Replace the kernels of ``params`` by `QArray`s (the frozen base of QLoRA).

    Args:
      params: a ``params`` tree (e.g. ``variables["params"]``), possibly with boxed leaves.
      qtype: one of `QTYPES` (``"nf4"``, ``"int4"``, ``"int8"``, ``"fp8"``, ``"q4_0"``, ...).
      targets: regex(es) ``re.fullmatch``-ed against each leaf's ``/``-joined path
        (``"conv/kernel"``) or against its module's path, as `LoraConfig.targets` (``"conv|emb"``:
        those modules' weights with 2+ axes: kernels, embedding tables, a layer's own matrices;
        not its ``bias`` or ``scale``); default: every leaf named ``kernel`` with 2 or more
        axes (all Dense-family layers).
      block: block size along ``axis`` (64 for nf4/int4, 32 for GGUF types).
      axis: the contraction axis of the kernels (``-2``: ``Dense (in, out)``, scanned stacks).
      double_quant: also quantize the block scales (nf4/int4).
      dtype: what the layers compute with (default: each kernel's own dtype).
      mesh: the ``jax.sharding.Mesh`` the boxed kernels will be sharded on (default: the box's
        own ``mesh``, else the mesh set by ``jax.set_mesh``, else none), see below.

    Returns:
      A new tree; ``params`` is not changed.

    Partitioned kernels (``nn.with_partitioning`` / ``nn.with_logical_partitioning`` boxes) come
    back as `QArray`s whose every array sits in a box of the same class, with the kernel's
    names on the axes it keeps (`partition_names`): the codes and the block scales are sharded
    like the kernel, so ``nn.get_partition_spec``, ``nn.logical_to_mesh_sharding`` and
    ``nn.unbox`` work as for a float tree. A name whose mesh axis does not divide that array's
    axis (e.g. 2 blocks of scales over 4 devices) is dropped there, replicating that array
    along that mesh axis, when the mesh is known (``mesh``); without a mesh every name is kept
    and ``jax.jit`` refuses such a sharding, naming the shape.

    >>> import jax, jax.numpy as jnp, jax_lora
    >>> q = jax_lora.quantize({"fc": {"kernel": jnp.ones((128, 8)), "bias": jnp.ones(8)}}, "nf4")
    >>> q["fc"]["kernel"]
    QArray(nf4, shape=(128, 8), block=64, axis=-2, dtype=float32)
    >>> q["fc"]["kernel"].codes.shape, q["fc"]["kernel"].scales.shape
    ((64, 8), (2, 8))

    An NNX model (``nnx.Module``) is quantized in place and returned (`quant_nnx.quantize_nnx`);
    its Variables keep their sharding names, which `quant_nnx.get_partition_spec` (given the
    mesh) turns into one spec per array of each `QArray`.
    """
    if _is_nnx_module(params):
        from .quant_nnx import quantize_nnx

        return quantize_nnx(
            params, qtype, targets=targets, block=block, axis=axis, double_quant=double_quant,
            dtype=dtype,
        )  # fmt: skip
    if has_quantized(params):
        done = [keypath_str(kp) for kp, x in _flat(params) if is_quantized(x)]
        raise ValueError(
            f"`params` is already quantized (e.g. '{done[0]}'); quantize the float tree "
            "once, or `jax_lora.dequantize` it first"
        )
    pats = None if targets is None else [targets] if isinstance(targets, str) else list(targets)
    found = []

    def one(kp, leaf):
        path = keypath_str(kp)
        value = leaf.value if hasattr(leaf, "unbox") else leaf
        if not _target_hit(pats, path, value):
            return leaf
        found.append(path)
        q = quantize_array(
            value,
            qtype,
            block=block,
            axis=axis,
            double_quant=double_quant,
            dtype=dtype,
            path=path,
        )
        return _boxed_like(leaf, q, mesh) if hasattr(leaf, "replace_boxed") else q

    out = jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_box)
    if not found:
        what = "no leaf named 'kernel' with 2+ axes" if pats is None else f"`targets` {pats}"
        paths = [keypath_str(kp) for kp, _ in _flat(params)][:20]
        raise ValueError(
            f"nothing to quantize: {what} matches no weight of `params` (leaves: {paths}); "
            "give a leaf path ('conv/kernel') or a module path ('conv')"
        )
    return out


_FIELDS = ("codes", "scales", "mins", "scales_scale", "scales_offset")


def partition_names(q: QArray, names: Sequence[Any], fits: Any = None) -> dict[str, tuple]:
    """Partitioning names of each array of ``q`` (``{field: names}``) from the kernel's
    ``names`` (one per kernel axis, as in ``nn.with_partitioning``).

    The codes keep the kernel's names (the packed axis too); the block scales (and q4_1's
    minima) keep them too, the block axis included, but a per-channel scale's size-1 axis is
    unnamed; double-quantized scales ``(*rest, k[-1] * nb)`` take the names of ``rest`` and of
    the kernel's last other axis (the flattened axis is major in it), their ``scales_scale``
    ``(*rest, n2)`` and ``scales_offset`` ``(*rest,)`` those of ``rest``. ``fits(name, size)``
    (default: always) says whether a name may shard an axis of that size; where it does not,
    the name is dropped (that array is replicated along it).
    """
    names = tuple(names)
    if len(names) != q.ndim:
        raise ValueError(f"{len(names)} partition names {names} for a kernel of shape {q.shape}")
    ax = q.ndim + q.axis
    others = names[:ax] + names[ax + 1 :]
    if q.scales_offset is not None:
        want = {
            "scales": (*others[:-1], others[-1]),
            "scales_scale": (*others[:-1], None),
            "scales_offset": others[:-1],
        }
    else:
        blocked = names[:ax] + (None,) + names[ax + 1 :] if q.qtype in _PER_CHANNEL else names
        want = {"scales": blocked, "mins": blocked}
    want["codes"] = names
    out = {}
    for field in _FIELDS:
        x = getattr(q, field)
        if x is None or field not in want:
            continue
        shape = np.shape(_unbox_leaf(x))
        out[field] = tuple(
            n if n is None or fits is None or fits(n, d) else None
            for n, d in zip(want[field], shape, strict=True)
        )
    return out


def _mesh_fits(box: Any, mesh: Any):
    """``fits(name, size)`` for `partition_names`: whether the mesh axes ``name`` maps to (by
    the box's logical rules, if any) divide ``size``; None when no mesh is known."""
    mesh = mesh if mesh is not None else getattr(box, "mesh", None)
    if mesh is None:
        current = jax.sharding.get_abstract_mesh()
        mesh = None if current.empty else current
    if mesh is None:
        return None
    sizes = dict(mesh.shape)
    logical = hasattr(box, "rules")
    if logical:
        import flax.linen as nn

        rules = box.rules if box.rules is not None else nn.get_logical_axis_rules()

    def fits(name: Any, size: int) -> bool:
        axes = nn.logical_to_mesh_axes((name,), rules)[0] if logical else name
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        return size % math.prod(sizes.get(a, 1) for a in axes) == 0

    return fits


def _boxed_like(box: Any, q: QArray, mesh: Any) -> QArray:
    """``q`` with each array in a box like ``box`` (a kernel's ``nn.Partitioned``), with names
    from `partition_names`."""
    names = getattr(box, "names", None)
    if names is None:
        return box.replace_boxed(q)
    per = partition_names(q, names, _mesh_fits(box, mesh))
    return q.replace(**{f: box.replace(value=getattr(q, f), names=n) for f, n in per.items()})


def _is_nnx_module(x: Any) -> bool:
    from flax import nnx

    return isinstance(x, nnx.Module)


def dequantize(tree: Any) -> Any:
    """Every `QArray` of ``tree`` back to a dense array (``q.shape`` in ``q.dtype``); an NNX
    model in place (its layers back to their classes without the quantized base)."""
    if _is_nnx_module(tree):
        from .quant_nnx import dequantize_nnx

        return dequantize_nnx(tree)
    return jax.tree.map(
        lambda x: rebox(x, dequantize_array(x)) if is_quantized(x) else x,
        tree,
        is_leaf=is_quantized,
    )


def rebox(q: Any, value: Any) -> Any:
    """``value`` in the partitioning box of the codes of ``q`` (a `QArray` of a boxed kernel,
    see `quantize`), else ``value`` as it is: a dense kernel boxed like the codes."""
    box = q.codes if is_quantized(q) else None
    return box.replace_boxed(value) if isinstance(box, meta.AxisMetadata) else value


def _is_box(x: Any) -> bool:
    return hasattr(x, "unbox") or is_quantized(x)


def _flat(tree: Any):
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]


def nbytes(tree: Any) -> int:
    """Bytes of all arrays in ``tree`` (a `QArray` counts its codes and scales)."""
    return sum(
        x.nbytes if is_quantized(x) else int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree, is_leaf=is_quantized)
    )


def bits_per_weight(q: QArray) -> float:
    return 8.0 * q.nbytes / math.prod(q.shape)


# ------------------------------------------------------------------------------- layers


def layer_has_quantized(module: Any) -> bool:
    """Whether a bound linen module's own ``params`` hold a `QArray`."""
    if module.scope is None:
        return False
    params = module.variables.get("params", {})
    return any(is_quantized(v) for v in params.values())


def _array_leaf(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def dequantized_call(module: Any, method: str, skip: str, isolate=lambda fn: fn) -> Any:
    """``module.<method>`` as a function of its arguments, run on the module's variables with
    every `QArray` dequantized; the backward pass recomputes the dequantization from the codes
    (see `_recomputed`), so no full-precision kernel outlives the layer. ``skip`` names a
    collection left out (the ``lora`` factors, which the caller adds outside); ``isolate``
    wraps the nested ``apply`` (forward and backward), e.g. to keep interceptors out of it."""
    variables = {c: v for c, v in module.variables.items() if c != skip}
    _check_factor_dtypes(module, skip)
    clone_apply = isolate(module.clone(parent=None).apply)

    def call(*args: Any, **kwargs: Any) -> Any:
        def run(zero, tree):
            v, a, k = tree
            v = jax.tree.map(lambda x: _plain(x) if is_quantized(x) else x, v, is_leaf=is_quantized)
            return clone_apply(dequantize(frozen_codes(v, zero)), *a, method=method, **k)

        return recomputed_apply(run, (variables, args, kwargs), (args, kwargs))

    return call


def recomputed_apply(fn: Any, tree: Any, inputs: Any, *, dynamic: Any = None) -> Any:
    """``fn(zero, tree)`` under `_recomputed`: differentiable in ``tree``'s arrays and
    `QArray`s (``dynamic(leaf)`` picks the arrays; default: jax/numpy arrays), its other leaves
    static; the forward pass waits for ``inputs`` (`input_marker`), the backward pass for the
    cotangent. ``fn`` ties the `QArray`s to ``zero`` (`_after`) before dequantizing them."""
    dynamic = _array_leaf if dynamic is None else dynamic
    flat, treedef = jax.tree.flatten(tree, is_leaf=is_quantized)
    dyn = [is_quantized(x) or dynamic(x) for x in flat]
    values = [x for x, d in zip(flat, dyn, strict=True) if d]

    def run(zero, *vals):
        it = iter(vals)
        leaves = [next(it) if d else leaf for leaf, d in zip(flat, dyn, strict=True)]
        return fn(zero, jax.tree.unflatten(treedef, leaves))

    return _recomputed(run)(input_marker(inputs), *values)


def _check_factor_dtypes(module: Any, collection: str) -> None:
    """LoRA factors narrower than the quantized base's compute dtype lose the update's bits."""
    qs = [q for q in module.variables.get("params", {}).values() if is_quantized(q)]
    factors = module.variables.get(collection, {})
    path = "/".join(map(str, module.path))
    for name, f in jax.tree_util.tree_flatten_with_path(factors)[0]:
        _check_factor_dtype(f"{path}/{keypath_str(name)}", f, qs)


def _check_factor_dtype(where: str, factor: Any, qs: Sequence[QArray]) -> None:
    """Refuse a LoRA factor at ``where`` narrower than the compute dtype of a quantized base
    weight ``qs`` of its layer (the update would lose its bits); linen and NNX."""
    f_dtype = np.dtype(getattr(factor, "dtype", np.float32))
    if not jnp.issubdtype(f_dtype, jnp.floating):
        return
    for q in qs:
        if jnp.finfo(f_dtype).bits < jnp.finfo(np.dtype(q.dtype)).bits:
            raise ValueError(
                f"the LoRA factor '{where}' is {f_dtype}, narrower than the compute dtype "
                f"{np.dtype(q.dtype).name} of the quantized base there; keep the factors in "
                "float32 (`LoraConfig(param_dtype=jnp.float32)`)"
            )


def frozen_codes(tree: Any, zero: jax.Array) -> Any:
    """``tree`` with every `QArray` tied to ``zero`` (`_after`) and frozen (``stop_gradient``):
    the quantized base gets no gradient; the layer's float params (a bias, a norm scale) keep
    theirs, so ``also_train`` trains them as on a float base."""
    return jax.tree.map(
        lambda x: jax.lax.stop_gradient(x) if is_quantized(x) else x,
        _after(tree, zero),
        is_leaf=is_quantized,
    )


def _zero_from(marker: jax.Array) -> jax.Array:
    """A float32 zero that XLA cannot compute before ``marker`` (NaN- and inf-safe)."""
    m = jnp.abs(marker.astype(jnp.float32))
    return jnp.where(jnp.isnan(m), jnp.float32(0), jnp.minimum(m, jnp.float32(0)))


def _after(tree: Any, zero: jax.Array) -> Any:
    """Every `QArray`'s codes plus ``zero``: unchanged values, but a data dependency on it."""

    def tie(q):
        if not is_quantized(q):
            return q
        # the scales too: their broadcast to the kernel's blocks is kernel-sized, and XLA would
        # otherwise compute it once, shared by the forward pass and the recomputation
        return q.replace(
            codes=q.codes + zero.astype(q.codes.dtype),
            scales=q.scales + zero.astype(q.scales.dtype),
        )

    return jax.tree.map(tie, tree, is_leaf=is_quantized)


def _float_array(x: Any) -> bool:
    return _array_leaf(x) and jnp.issubdtype(x.dtype, jnp.floating)


def _recomputed(f):
    """``f(zero, *xs)`` differentiable in ``xs``, its backward pass recomputing ``f`` after the
    cotangent exists.

    ``jax.checkpoint`` is not enough on CPU: XLA drops its optimization barriers there, so it
    merges the recomputation with the forward pass and runs every layer's dequantization (it
    depends on the parameters only) up front, all kernels alive at once. Instead ``f`` gets a
    zero computed from a data dependency it cannot skip: an element of the layer input in the
    forward pass, of the cotangent in the backward pass, so one layer's kernel exists at a time.
    """

    def tied(zero, *xs):  # the float inputs too: a product of the factors alone (DoRA's
        # B·A, kernel-sized) would otherwise be shared by XLA between the forward pass and the
        # recomputation, i.e. kept alive from one to the other, one per layer
        tie = lambda x: x + zero.astype(x.dtype) if _float_array(x) else x  # noqa: E731
        return f(zero, *jax.tree.map(tie, xs, is_leaf=is_quantized))

    @jax.custom_vjp
    def g(marker, *xs):
        return tied(_zero_from(marker), *xs)

    def fwd(marker, *xs):
        return g(marker, *xs), (marker, xs)

    def bwd(res, ct):
        marker, xs = res
        first = [  # non-empty: an empty batch's cotangent has no element to depend on
            c for c in jax.tree.leaves(ct) if jnp.issubdtype(c.dtype, jnp.floating) and c.size
        ]
        zero = _zero_from(first[0].reshape(-1)[0]) if first else jnp.zeros((), jnp.float32)
        grads = jax.vjp(lambda *xs: tied(zero, *xs), *xs)[1](ct)
        return (jnp.zeros_like(marker), *grads)

    g.defvjp(fwd, bwd)

    def call(marker, *xs):
        # the marker only orders the computation: no cotangent. A zero one would be padded to
        # the shape of the input it is an element of, and XLA hoists that zero buffer out of
        # an `nn.scan` of layers, alive for the whole backward pass (8 MiB for SmolLM2)
        return g(jax.lax.stop_gradient(marker), *xs)

    return call


# ------------------------------------------------------------- any layer (jax_lora.weights)


def abstract(x: Any) -> Any:
    """A `QArray` as the ``jax.ShapeDtypeStruct`` of the array it stands for (to trace a layer
    on its dequantized weight); anything else unchanged."""
    return jax.ShapeDtypeStruct(x.shape, np.dtype(x.dtype)) if is_quantized(x) else x


def input_marker(inputs: Any) -> jax.Array:
    """One element of the first non-empty array in ``inputs`` (a float one if there is one),
    for `dequantized_evaluate`: the dequantization waits for the layer's input."""
    arrays = [x for x in jax.tree.leaves(inputs) if _array_leaf(x) and np.size(x)]
    floats = [x for x in arrays if jnp.issubdtype(x.dtype, jnp.floating)]
    pick = floats or [x for x in arrays if jnp.issubdtype(x.dtype, jnp.number)]
    return jnp.asarray(pick[0]).reshape(-1)[0] if pick else jnp.zeros((), jnp.float32)


def dequantized_evaluate(fn: Any, values: list[Any], trainable: Any, marker: jax.Array) -> Any:
    """``fn(values, trainable)`` with every `QArray` in the flat list ``values`` replaced by its
    dequantized array (frozen: no gradient). The backward pass recomputes ``fn`` and the
    dequantization from the codes (see `_recomputed`), so no full-precision copy of a weight is
    kept alive across the step; ``trainable`` (the LoRA factors) and the other ``values`` (the
    layer's input, its float params) get their gradients as usual."""

    def run(zero, values, trainable):
        dense = [
            dequantize_array(jax.lax.stop_gradient(_after(v, zero))) if is_quantized(v) else v
            for v in values
        ]
        return fn(dense, trainable)

    return _recomputed(run)(marker, values, trainable)


# ------------------------------------------------------------------ row lookup (embedding)


def _untakeable(q: QArray, axis: int) -> str | None:
    """Why `take` cannot gather ``q`` along ``axis`` (None: it can)."""
    if q.scales_offset is not None:
        return f"{q!r} is double-quantized (its scales span several rows)"
    if q.axis % q.ndim == axis % q.ndim and q.qtype not in _PER_CHANNEL:
        return f"the quantization blocks of {q!r} run along axis {axis}"
    return None


def can_take(q: QArray, axis: int = 0) -> bool:
    """Whether `take` gathers ``q`` along ``axis`` (else it raises ValueError)."""
    return _untakeable(q, axis) is None


def take(q: QArray, ids: jax.Array, axis: int = 0) -> QArray:
    """The slices ``ids`` of ``q`` along ``axis`` (``jnp.take(dequantize_array(q), ids, axis)``
    without dequantizing the rest): codes, scales and mins gathered, the blocks untouched.

    ``q: (..., n, ...)`` (``n`` at ``axis``), ``ids: (i...)`` -> a `QArray` of shape
    ``(..., i..., ...)``. Negative ids count from the end (once), other out-of-range ids are
    clipped (`take_dequantized` fills them with NaN, as ``jnp.take``). Raises ValueError where
    the quantization blocks run along ``axis`` (a row's block straddles other rows) or ``q`` is
    double-quantized (its scales are laid out across rows): dequantize the whole array there.
    """
    why = _untakeable(q, axis)
    if why is not None:
        raise ValueError(f"take: {why}; dequantize the whole array instead")
    q = _plain(q)
    nd = q.ndim
    ax = axis % nd
    qax = q.axis % nd
    n = q.shape[ax]
    ids = jnp.asarray(ids)
    idx = jnp.where(ids < 0, ids + n, ids) if jnp.issubdtype(ids.dtype, jnp.signedinteger) else ids
    k = ids.ndim

    def gather(x):
        if x is None:
            return None
        if x.shape[ax] == 1 and n != 1:  # per-channel scales: one for all rows
            return x.reshape(x.shape[:ax] + (1,) * k + x.shape[ax + 1 :])
        return jnp.take(x, idx, axis=ax, mode="clip")

    pos = qax if qax < ax else qax + k - 1
    return q.replace(
        codes=gather(q.codes),
        scales=gather(q.scales),
        mins=gather(q.mins),
        axis=pos - (nd + k - 1),
    )


def embed_rows(q: Any, inputs: jax.Array, num_embeddings: int) -> jax.Array | None:
    """A quantized embedding table's lookup (``nn.Embed``/``nnx.Embed.__call__``) with only the
    rows taken dequantized (`take_dequantized`, no gradient to the codes), before the layer's
    dtype promotion; None where the table cannot be gathered so (not a `QArray`, blocks along
    the rows, double quantization, or one row, which flax broadcasts): the caller then
    dequantizes the whole table. ``q: (n, d)``, ``inputs: (i...)`` integer -> ``(i..., d)``."""
    if not is_quantized(q) or not can_take(q) or num_embeddings == 1:
        return None
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError("Input type must be an integer or unsigned integer.")
    return take_dequantized(jax.lax.stop_gradient(q), inputs)


def take_dequantized(q: QArray, ids: jax.Array, axis: int = 0) -> jax.Array:
    """``jnp.take(dequantize_array(q), ids, axis=axis)`` (its default ``mode="fill"``: NaN for
    ids out of ``[-n, n)``), bit for bit, dequantizing only the rows taken (`take`).

    ``q: (..., n, ...)``, ``ids: (i...)`` integer -> ``(..., i..., ...)`` in ``q.dtype``."""
    nd = q.ndim
    ax = axis % nd
    n = q.shape[ax]
    ids = jnp.asarray(ids)
    rows = dequantize_array(take(q, ids, axis))
    valid = ids < n
    if jnp.issubdtype(ids.dtype, jnp.signedinteger):
        valid = valid & (ids >= -n)
    valid = jnp.broadcast_to(
        valid.reshape((1,) * ax + ids.shape + (1,) * (nd - ax - 1)), rows.shape
    )
    return jnp.where(valid, rows, jnp.array(jnp.nan, rows.dtype))
