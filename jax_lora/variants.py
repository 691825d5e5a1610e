"""PiSSA and OLoRA: LoRA factors taken from the pretrained weights (the base becomes the residual
``W - scale * a @ b``), and the conversion of a trained adapter back to plain LoRA for ``W``.

PiSSA (arXiv 2404.02948; PEFT ``init_lora_weights="pissa"`` / ``"pissa_niter_K"``) uses the top
``r`` singular triplets of ``W``; OLoRA (arXiv 2406.01775; PEFT ``"olora"``) the first ``r``
columns of ``W``'s QR decomposition. Both follow PEFT's formulas on torch's ``(out, in)`` view of
the kernel, so the factors equal PEFT's (up to the signs LAPACK picks).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from . import dora, weights
from .config import LoraConfig
from .merge import _apply, _geometry, _layer, _target
from .targets import path_str, weight_path
from .trees import factor_nodes

METHODS = ("pissa", "olora")


def _swap(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _matrices(w: jax.Array, geom: weights.WeightGeometry) -> jax.Array:
    """The weight as ``(L, fan_in, fan_out)`` fp32 matrices (``L`` = product of lead axes)."""
    m = jnp.transpose(w, geom.lead + geom.ins + geom.outs).astype(jnp.float32)
    lead = math.prod(w.shape[i] for i in geom.lead)
    return m.reshape(lead, geom.fan_in, geom.fan_out)


def svd_lowrank(
    m: jax.Array, q: int, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Randomised SVD ``m ~ U diag(S) V^T`` of rank ``q`` (Halko et al. 2009, Alg. 5.1, with
    ``niter`` subspace iterations), as ``torch.svd_lowrank``: ``U (..., rows, q)``,
    ``S (..., q)``, ``V (..., cols, q)``."""
    rows, cols = m.shape[-2:]
    if rows < cols:
        v, s, u = svd_lowrank(_swap(m), q, niter, key)
        return u, s, v
    hi = jax.lax.Precision.HIGHEST
    r = jax.random.normal(key, (cols, q), m.dtype)
    basis = jnp.linalg.qr(jnp.matmul(m, r, precision=hi))[0]
    for _ in range(niter):
        basis = jnp.linalg.qr(jnp.matmul(_swap(m), basis, precision=hi))[0]
        basis = jnp.linalg.qr(jnp.matmul(m, basis, precision=hi))[0]
    u, s, vh = jnp.linalg.svd(jnp.matmul(_swap(basis), m, precision=hi), full_matrices=False)
    return jnp.matmul(basis, u, precision=hi), s, _swap(vh)


def pissa_factors(
    m: jax.Array, rank: int, scale: float, *, niter: int | None = None, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """PiSSA factors of ``m: (..., in, out)``: ``a (..., in, r)``, ``b (..., r, out)`` with
    ``scale * a @ b`` the best rank-``r`` approximation of ``m`` (exact SVD, or the randomised
    one with ``niter`` iterations). PEFT: ``lora_A = sqrt(S/scale) Uh``, ``lora_B = V sqrt(S/scale)``
    for ``W = V S Uh``, ``W = m^T``."""
    w = _swap(m)  # torch's (out, in) view: PEFT decomposes this one
    if niter is None:
        v, s, uh = jnp.linalg.svd(w, full_matrices=False)
        v, s, uh = v[..., :rank], s[..., :rank], uh[..., :rank, :]
    else:
        if key is None:
            raise ValueError("the randomised SVD (`niter`) needs a `key`")
        v, s, u = svd_lowrank(w, rank, niter, key)
        uh = _swap(u)
    root = jnp.sqrt(s / scale)
    lora_a = root[..., :, None] * uh  # (..., r, in)
    lora_b = v * root[..., None, :]  # (..., out, r)
    return _swap(lora_a), _swap(lora_b)


def olora_factors(m: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA factors of ``m: (..., in, out)``: PEFT's ``Q, R = qr(W)`` for ``W = m^T``,
    ``lora_A = R[:r]``, ``lora_B = Q[:, :r]``; returned as ``a (..., in, r)``, ``b (..., r, out)``.
    """
    q, r = jnp.linalg.qr(_swap(m))
    return _swap(r[..., :rank, :]), _swap(q[..., :, :rank])


def _check_float(w: Any, method: str, where: str) -> None:
    if not isinstance(w, (jax.Array, np.ndarray)) or not jnp.issubdtype(w.dtype, jnp.floating):
        what = getattr(w, "dtype", type(w).__name__)
        raise TypeError(
            f"{method}: the weight at '{where}' is {what}, not a floating array (a quantized "
            "base?). Initialise on the float model, then quantize the residual weights it "
            "returns (PEFT's advice for PiSSA too)."
        )


def _factors(method, m, rank, scale, niter, key) -> tuple[jax.Array, jax.Array]:
    if method == "olora":
        return olora_factors(m, rank)
    return pissa_factors(m, rank, scale, niter=niter, key=key)


def _norm(w: jax.Array, geom: weights.WeightGeometry, a: Any) -> jax.Array:
    """DoRA's ``‖W‖`` over the input axes of ``w`` (stored with roles ``geom``): (lead..., out...)."""
    r = np.shape(a)[-1]
    zero_a = jnp.zeros((*(geom.shape[i] for i in geom.lead + geom.ins), r), jnp.float32)
    zero_b = jnp.zeros(
        (*(geom.shape[i] for i in geom.lead), r, *(geom.shape[i] for i in geom.outs))
    )
    return dora.weight_norm_stored(w.astype(jnp.float32), zero_a, zero_b, 0.0, geom)


def _init_nnx(model: Any, method: str, niter: int | None, key: jax.Array | None) -> dict:
    """`init_from_weights` for an adapted NNX model: in place; returns the initial factors."""
    from .nnx import (
        _by_weight,
        _factors_lead_first,
        _lead_first,
        _stored,
        adapted_layers,
        lora_state,
    )

    layers = adapted_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA factors: `jax_lora.wrap` it first")
    slots = []
    for path, layer in layers:
        if _by_weight(layer):
            scales = dict(layer.lora_scale)
            for n, geom in layer.lora_geoms:
                slots.append((weight_path(path, n), layer, n, f"{n}_lora_", scales[n], geom))
        else:
            slots.append((path, layer, "kernel", "lora_", layer.lora_scale, None))
    keys = iter(jax.random.split(key, len(slots))) if key is not None else None
    writes = []  # everything is computed before the model changes: a failure leaves it as it was
    for where, layer, name, prefix, scale, geom in slots:
        w = getattr(layer, name)[...]
        _check_float(w, method, where)
        a0, b0 = getattr(layer, prefix + "a")[...], getattr(layer, prefix + "b")[...]
        k = kpos = None  # a stack along a non-leading axis (`wrap_nnx(stack_axis=)`): stack-first
        if geom is None and getattr(layer, "lora_stack_axis", None) is not None:
            a0, b0, _, kpos = _factors_lead_first(layer)
            k, w = layer.lora_stack_axis, _lead_first(w, kpos)
        if geom is None:
            geom = _geometry(tuple(w.shape), a0, b0, generic=False, known=None, where=where)
        key_ = next(keys) if keys is not None else None
        a, b = _factors(method, _matrices(w, geom), a0.shape[-1], scale, niter, key_)
        a, b = a.reshape(a0.shape).astype(a0.dtype), b.reshape(b0.shape).astype(b0.dtype)
        d = weights.delta(geom, a, b, -scale)
        m = getattr(layer, prefix + "m", None)  # DoRA: m = ‖W‖ = ‖W_res + s·a@b‖ (as PEFT)
        m = None if m is None else _stored(_norm(w, geom, a0).astype(m[...].dtype), k)
        res = _stored((w.astype(d.dtype) + d).astype(w.dtype), kpos)
        writes.append((layer, name, prefix, res, _stored(a, k), _stored(b, k), m))
    for layer, name, prefix, w, a, b, m in writes:
        getattr(layer, name)[...] = w
        getattr(layer, prefix + "a")[...] = a
        getattr(layer, prefix + "b")[...] = b
        if m is not None:
            getattr(layer, prefix + "m")[...] = m
    return lora_state(model)


def init_from_weights(
    variables: Any,
    config: Any = None,
    *args: Any,
    method: str = "pissa",
    niter: int | None = None,
    key: jax.Array | None = None,
    **kwargs: Any,
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """PiSSA / OLoRA initialisation: new factors from each adapted weight, and the new base.

    **The base changes**: each adapted ``W`` becomes ``W - scale * a @ b`` (computed in fp32,
    stored in ``W``'s dtype), so the model's output is unchanged at the start; train the returned
    factors on the returned params, and keep the original params (and the returned initial
    factors) to `convert_to_lora` after training.

    Args:
      variables: ``{"params": ..., "lora": ...}`` as made by a wrapped module (the ``lora`` tree
        says which weights, at which rank; its values are ignored).
      config: the `LoraConfig` (``scale`` per layer), or the wrapped model; with the wrapped
        model, ``*args, **kwargs`` is an example input, as for `jax_lora.merge`.
      method: ``"pissa"`` (PEFT ``init_lora_weights="pissa"``) or ``"olora"``.
      niter: PiSSA only: use the randomised SVD with ``niter`` subspace iterations (PEFT's
        ``"pissa_niter_<niter>"``; its factors differ from the exact ones by a rotation).
      key: the random key of the randomised SVD.

    Returns:
      ``(lora, params)``: factors ``a (lead..., in..., r)``, ``b (lead..., r, out...)`` in the
      ``lora`` tree's dtypes, and the residual params (a new tree; ``variables`` is untouched).

    NNX: ``init_from_weights(model, method=...)`` sets the factors and the residual weights of
    the adapted ``model`` in place and returns ``(lora_state(model), None)``; keep the initial
    factors for `convert_to_lora`.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jax_lora
    >>> wrapped = jax_lora.wrap(nn.Dense(6), jax_lora.LoraConfig(rank=2))
    >>> x = jnp.ones((1, 4))
    >>> v = wrapped.init(jax.random.key(0), x)
    >>> lora, params = jax_lora.init_from_weights(v, wrapped.config, method="pissa")
    >>> jax.tree.map(jnp.shape, lora)
    {'a': (4, 2), 'b': (2, 6)}
    >>> y = wrapped.apply({"params": params, "lora": lora}, x)
    >>> bool(jnp.allclose(y, nn.Dense(6).apply(v, x), atol=1e-5))
    True
    """
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if niter is not None and method != "pissa":
        raise ValueError("`niter` (the randomised SVD) is for method='pissa' only")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"`niter` must be an integer >= 0, got {niter!r}")
    if niter is not None and key is None:
        raise ValueError("the randomised SVD (`niter`) needs a `key`")
    from flax import nnx

    if isinstance(variables, nnx.Module):
        if config is not None or args or kwargs:
            raise TypeError("for an NNX model call `init_from_weights(model, method=...)` alone")
        return _init_nnx(variables, method, niter, key), None
    cfg, known = _target(config, args, kwargs, variables)
    if not isinstance(cfg, LoraConfig):
        raise TypeError(f"expected a jax_lora.LoraConfig or a wrapped model, got {type(cfg)}")
    for k in ("params", "lora"):
        if not isinstance(variables, Mapping) or k not in variables:
            raise ValueError(f"`variables` has no {k!r} entry; pass {{'params': ..., 'lora': ...}}")
    params = variables["params"]
    lora: dict[str, Any] = {}
    nodes = list(factor_nodes(meta.unbox(variables["lora"])))
    keys = iter(jax.random.split(key, len(nodes))) if key is not None else None
    for path, node in nodes:
        where = path_str(path) or "<root>"
        holder, name, generic = _layer(params, path, where)
        w = meta.unbox(holder[name])
        _check_float(w, method, where)
        a0, b0 = node["a"], node["b"]
        rank = np.shape(a0)[-1]
        if rank != cfg.rank_for(path_str(path)):
            raise ValueError(
                f"`lora` factors at '{where}' have rank {rank}, but the config's rank there is "
                f"{cfg.rank_for(path_str(path))}. Use the config the factors were made with."
            )
        geom = _geometry(
            tuple(w.shape), a0, b0, generic=generic, known=(known or {}).get(where), where=where
        )
        k = next(keys) if keys is not None else None
        a, b = _factors(
            method, _matrices(jnp.asarray(w), geom), rank, cfg.scale_for(where), niter, k
        )
        sub = lora
        for part in path[:-1]:
            sub = sub.setdefault(part, {})
        new = {
            "a": a.reshape(np.shape(a0)).astype(a0.dtype),
            "b": b.reshape(np.shape(b0)).astype(b0.dtype),
        }
        if dora.MAGNITUDE in node:  # DoRA: m = ‖W‖ = ‖W_res + s·a@b‖ (PEFT's dora_init after
            m0 = node[dora.MAGNITUDE]  # pissa/olora_init), so the output is unchanged at start
            new[dora.MAGNITUDE] = _norm(jnp.asarray(w), geom, a0).astype(m0.dtype)
        if path:
            sub[path[-1]] = new
        else:
            lora = new
    plain = jax.tree.map(  # W - s·a@b in fp32: the plain LoRA update (DoRA's m aside)
        lambda n: {k: v for k, v in n.items() if k != dora.MAGNITUDE},
        lora,
        is_leaf=lambda n: isinstance(n, Mapping) and "a" in n and "b" in n,
    )
    plain_cfg = dataclasses.replace(cfg, use_dora=False)
    residual = _apply({"params": params, "lora": plain}, plain_cfg, -1.0, known)
    return lora, residual


def convert_to_lora(
    lora: Mapping[str, Any], initial: Mapping[str, Any], config: LoraConfig
) -> tuple[dict[str, Any], LoraConfig]:
    """A trained PiSSA/OLoRA adapter as a plain LoRA adapter for the *original* base weights, as
    PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``.

    ``W_res + s·a@b = W + s·(a@b - a0@b0)``, so the plain adapter is ``a' = [a | a0]``
    (``(..., in..., 2r)``) and ``b' = [b ; -b0]`` (``(..., 2r, out...)``), at rank ``2r`` with
    ``alpha`` doubled (``* sqrt(2)`` with ``rslora``) so the scale is unchanged; ``rank_pattern``
    and ``alpha_pattern`` likewise (PEFT refuses ``rslora`` with patterns here; this keeps each
    layer's scale).

    Args:
      lora: the trained factors.
      initial: the factors `init_from_weights` returned (before training).
      config: their `LoraConfig`.

    Returns:
      ``(lora, config)`` for the original params (`jax_lora.merge` or ``export_peft`` them).
    """
    got = dict(factor_nodes(meta.unbox(lora)))
    init = dict(factor_nodes(meta.unbox(initial)))
    if set(got) != set(init):
        only = sorted(path_str(p) for p in set(got) ^ set(init))
        raise ValueError(f"`lora` and `initial` have factors at different layers: {only[:10]}")
    out: dict[str, Any] = {}
    for path, node in got.items():
        a0, b0 = init[path]["a"], init[path]["b"]
        a, b = node["a"], node["b"]
        if np.shape(a) != np.shape(a0) or np.shape(b) != np.shape(b0):
            raise ValueError(
                f"factors at '{path_str(path)}': trained a {np.shape(a)}, b {np.shape(b)} vs "
                f"initial a {np.shape(a0)}, b {np.shape(b0)}"
            )
        n_lead = _n_lead(np.shape(a), np.shape(b))
        new = {
            "a": jnp.concatenate([jnp.asarray(a), jnp.asarray(a0)], axis=-1),
            "b": jnp.concatenate([jnp.asarray(b), -jnp.asarray(b0)], axis=n_lead),
        }
        sub = out
        for part in path[:-1]:
            sub = sub.setdefault(part, {})
        if path:
            sub[path[-1]] = new
        else:
            out = new
    grow = math.sqrt(2) if config.rslora else 2  # keeps every layer's scale alpha / (r or sqrt r)
    converted = LoraConfig(
        **{
            **{f: getattr(config, f) for f in config.__dataclass_fields__},
            "rank": 2 * config.rank,
            "alpha": config.alpha * grow,
            "rank_pattern": [(k, 2 * r) for k, r in config.rank_pattern],
            "alpha_pattern": [(k, grow * a) for k, a in config.alpha_pattern],
        }
    )
    return out, converted


def _n_lead(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """The number of lead axes of ``a (lead..., in..., r)``, ``b (lead..., r, out...)``: the
    longest shared prefix followed by the rank in ``b`` (a stack of ``L == r`` layers reads
    right; only a non-stacked ``b (r, r, ...)`` with ``a (r, ...)`` would read as a stack)."""
    r = a_shape[-1]
    # i lead axes leave a >= 1 input axis and b >= 1 output axis (a (4, 4), b (4, 4) is no stack)
    for i in reversed(range(min(len(a_shape), len(b_shape)) - 1)):
        if b_shape[i] == r and a_shape[:i] == b_shape[:i]:
            return i
    raise ValueError(f"factors a {a_shape}, b {b_shape} have no shared rank axis")
