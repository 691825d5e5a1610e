"""Many named LoRA adapters over one frozen model (linen and NNX): the tree helpers, per-example
adapters in one batch (stacked factors gathered per row, BGMV-style), PEFT's weighted
combinations and PEFT's one-folder-per-adapter layout.

Layout: ``variables["lora"] = {name: <the single-adapter lora tree of that adapter>}``, each
subtree exactly what ``jax_lora.wrap(model, config)`` makes for that adapter's `LoraConfig`
(NNX: `adapters_state` gives the same).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from . import factors, quant
from .config import LoraConfig
from .switch import lora_enabled
from .targets import path_str
from .trees import COLLECTION, factor_nodes

COMBINATIONS = ("linear", "cat", "svd")
"""`combine_adapters` methods, as PEFT's ``add_weighted_adapter(combination_type=...)``."""


def _check_name(name: Any) -> str:
    # each name is also a folder name (`export_peft_adapters`) and a torch ModuleDict key in
    # PEFT, which forbids '.': so no '.', path separators or NUL (no '..', no hidden folders)
    if not isinstance(name, str) or not name or any(c in name for c in "/\\.\x00"):
        raise ValueError(
            "an adapter name must be a non-empty str without '/', '\\', '.' or NUL (it names a "
            f"folder and a PEFT module key), got {name!r}"
        )
    return name


def _check_once(active: tuple[str, ...]) -> None:
    for k in active:
        if active.count(k) > 1:
            raise ValueError(f"`active` lists adapter {k!r} twice (its branch would add twice)")


def _names_line(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names) or "none"


# --- pure helpers over the variables tree ---------------------------------------------------


def adapter_names(variables: Mapping[str, Any]) -> list[str]:
    """The adapter names in ``variables["lora"]``, in their stored order."""
    return list(variables.get(COLLECTION, {}))


def add_adapter(variables: Mapping[str, Any], name: str, lora: Mapping[str, Any]) -> dict:
    """A copy of ``variables`` with the single-adapter tree ``lora`` added as adapter ``name``.

    ``variables`` is left unchanged. Raises if ``name`` is already there.
    """
    _check_name(name)
    have = dict(variables.get(COLLECTION, {}))
    if name in have:
        raise ValueError(
            f"adapter {name!r} already exists (adapters: {_names_line(list(have))}); "
            "`delete_adapter` it first or pick another name"
        )
    list(factor_nodes(nn.meta.unbox(lora)))  # a malformed tree raises here, naming the path
    return {**variables, COLLECTION: {**have, name: lora}}


def delete_adapter(variables: Mapping[str, Any], name: str) -> dict:
    """A copy of ``variables`` without adapter ``name`` (``variables`` is left unchanged)."""
    have = dict(variables.get(COLLECTION, {}))
    if name not in have:
        raise KeyError(f"no adapter {name!r} to delete; adapters: {_names_line(list(have))}")
    del have[name]
    return {**variables, COLLECTION: have}


# --- the wrapper ------------------------------------------------------------------------------


def _dense_family():
    from .linen import SUPPORTED_LINEN

    return SUPPORTED_LINEN


def _node_at(tree: Any, path: tuple[str, ...]) -> Mapping[str, Any] | None:
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    if isinstance(tree, Mapping) and set(tree) == {"a", "b"}:
        return tree
    return None


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as numpy when it is a concrete value, None when it is traced."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_ids(adapter_ids: Any, n_adapters: int) -> jax.Array:
    """``adapter_ids`` as an int32 array ``(batch,)``; concrete ids must be in ``[-1, n)``.

    Traced ids cannot raise under ``jit``: a row whose id is outside ``[-1, n)`` then gets the
    base output only (the same as ``-1``).
    """
    dtype = getattr(adapter_ids, "dtype", None)
    if dtype is None:
        adapter_ids = np.asarray(adapter_ids)
        dtype = adapter_ids.dtype
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"`adapter_ids` must be an integer array (batch,), got dtype {dtype}")
    if np.ndim(adapter_ids) != 1:
        raise ValueError(
            f"`adapter_ids` must have shape (batch,), got {tuple(np.shape(adapter_ids))}"
        )
    values = _concrete(adapter_ids)
    if values is not None:
        bad = np.flatnonzero((values < -1) | (values >= n_adapters))
        if bad.size:
            raise ValueError(
                f"`adapter_ids`[{bad[0]}] = {values[bad[0]]} is out of range: ids index the "
                f"{n_adapters} declared adapter(s) (0..{n_adapters - 1}), -1 means the base "
                "model only"
            )
    return jnp.asarray(adapter_ids).astype(jnp.int32)


class _Multi:
    """Interceptor: adds the branch of the selected adapter(s) to every Dense-family layer."""

    def __init__(self, wrapper: MultiLoraWrapped, lora, ids, active: tuple[str, ...]):
        self.wrapper, self.lora, self.ids, self.active = wrapper, lora, ids, active
        self.names = wrapper.names
        self.configs = dict(wrapper.adapters)
        self.used: set[tuple[str, tuple[str, ...]]] = set()

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        n = len(self.wrapper.path)
        ours = tuple(module.path[:n]) == tuple(self.wrapper.path)
        if ours and context.method_name != "setup" and quant.layer_has_quantized(module):
            from .linen import COLLECTION, _unintercepted  # QLoRA: the layer runs dequantized

            next_fun = quant.dequantized_call(
                module, context.method_name, COLLECTION, _unintercepted
            )
        y = next_fun(*args, **kwargs)
        if not isinstance(module, _dense_family()) or context.method_name != "__call__":
            return y
        if not ours:
            return y
        rel = tuple(module.path[n:])
        nodes = {k: _node_at(self.lora[k], rel) for k in self.names}
        nodes = {k: v for k, v in nodes.items() if v is not None}
        if not nodes:
            return y
        from .linen import _geometry, _input

        path = path_str(module.path)
        geom = _geometry(module, args, kwargs, path)
        if geom.batch_dims:
            raise ValueError(f"named adapters: layer '{path}' has batch_dims; not supported")
        for k, node in nodes.items():
            self.used.add((k, rel))
            _check_node(k, path, node, geom)
            want = self.configs[k].rank_for(path_str(rel))
            if node["a"].shape[-1] != want:
                raise ValueError(
                    f"adapter {k!r} at '{path}' has factors of rank {node['a'].shape[-1]}, but "
                    f"its config says rank {want} there (the scale alpha / rank would be "
                    "wrong). Declare it with the config it was made with."
                )
        x = _input(args, kwargs).astype(y.dtype)
        if self.ids is None:
            for k in self.active:
                if k in nodes:
                    a, b = nodes[k]["a"], nodes[k]["b"]
                    scale = self.configs[k].scale_for(path_str(rel))  # alpha_pattern, ...
                    y = y + factors.branch(x, a, b, geom, scale, module.precision)
            return y
        scales = [self.configs[k].scale_for(path_str(rel)) for k in self.names]
        return y + gathered_branch(
            x, nodes, self.names, scales, self.ids, geom, path, module.precision
        )


def gathered_branch(
    x: jax.Array,
    nodes: Mapping[str, Mapping[str, jax.Array]],
    names: Sequence[str],
    scales: Sequence[float],
    ids: jax.Array,
    geom: factors.Geometry,
    path: str,
    precision: Any = None,
) -> jax.Array:
    """The per-row LoRA branch of one layer: row ``i`` uses adapter ``names[ids[i]]``.

    ``nodes`` maps the adapters that adapt this layer to ``{"a": (in..., r_k), "b": (r_k,
    out...)}``; ``scales[k]`` is adapter ``names[k]``'s scale. The factors are stacked as
    ``(n, in..., r_max)`` and ``(n, r_max, out...)`` (zero-padded to the largest rank, zero for
    adapters absent here), gathered per row and contracted in two batched matmuls. Rows whose id
    is outside ``[0, n)`` get zero. Returns the layer's output shape, in ``x.dtype``.
    """
    if x.shape[0] != ids.shape[0]:
        raise ValueError(
            f"`adapter_ids` has {ids.shape[0]} rows, but the input of layer '{path}' has "
            f"shape {x.shape}: its first axis must be the batch"
        )
    r_max = max(int(node["a"].shape[-1]) for node in nodes.values())
    stack_a, stack_b, kept = [], [], []
    for k, scale in zip(names, scales, strict=True):
        node = nodes.get(k)
        if node is None:
            stack_a.append(jnp.zeros((*geom.a_shape, r_max), x.dtype))
            stack_b.append(jnp.zeros((r_max, *geom.out_shape), x.dtype))
            kept.append(0.0)
            continue
        pad = r_max - node["a"].shape[-1]
        stack_a.append(
            jnp.pad(node["a"].astype(x.dtype), [(0, 0)] * len(geom.a_shape) + [(0, pad)])
        )
        stack_b.append(
            jnp.pad(node["b"].astype(x.dtype), [(0, pad)] + [(0, 0)] * len(geom.out_shape))
        )
        kept.append(scale)
    n = len(names)
    inside = (ids >= 0) & (ids < n)
    idx = jnp.clip(ids, 0, n - 1)
    row_scale = jnp.where(inside, jnp.asarray(kept, x.dtype)[idx], jnp.zeros((), x.dtype))
    a_rows, b_rows = jnp.stack(stack_a)[idx], jnp.stack(stack_b)[idx]
    if geom.kind == "einsum":
        eq_a, eq_b = _batched_einsum(geom, path)
        h = jnp.einsum(eq_a, x, a_rows, precision=precision)
        h = h * row_scale.reshape((-1,) + (1,) * (h.ndim - 1))
        return jnp.einsum(eq_b, h, b_rows, precision=precision)
    if geom.batch_dims or 0 in geom.axis:
        raise ValueError(
            f"layer '{path}' contracts or batches over axis 0; per-row adapters need it to be "
            "the batch"
        )
    na = len(geom.axis)
    h = lax.dot_general(
        x, a_rows, ((geom.axis, tuple(range(1, 1 + na))), ((0,), (0,))), precision=precision
    )
    h = h * row_scale.reshape((-1,) + (1,) * (h.ndim - 1))
    return lax.dot_general(h, b_rows, (((h.ndim - 1,), (1,)), ((0,), (0,))), precision=precision)


def _batched_einsum(geom: factors.Geometry, path: str) -> tuple[str, str]:
    """``geom``'s two einsums with the factors given one row each (batch letter = x's first)."""
    x_spec, rest = geom.eq_a.split(",")
    a_spec, h_spec = rest.split("->")
    h_in, tail = geom.eq_b.split(",")
    b_spec, out = tail.split("->")
    batch = x_spec[:1]
    if not batch or batch == "." or batch not in out:
        raise ValueError(
            f"Einsum at '{path}': per-row adapters need the input's first axis to be a batch "
            f"axis kept in the output ({geom.eq_a!r}, {geom.eq_b!r})"
        )
    return f"{x_spec},{batch}{a_spec}->{h_spec}", f"{h_in},{batch}{b_spec}->{out}"


def _check_node(name: str, path: str, node: Mapping[str, Any], geom: factors.Geometry) -> None:
    a, b = tuple(np.shape(node["a"])), tuple(np.shape(node["b"]))
    r = a[-1] if a else None
    extra = len(a) - len(geom.a_shape) - 1
    if (
        extra > 0
        and a[extra:] == (*geom.a_shape, r)
        and b == (*a[:extra], *geom.lead_shape, r, *geom.out_shape)
    ):
        raise ValueError(
            f"adapter {name!r} at '{path}': its factors are stacked {a[:extra]} (a layer inside "
            "nn.scan / nn.vmap), but named adapters read each layer's own factors, unstacked. "
            "Unroll the stack, or use a single-adapter `jax_lora.wrap(model, config)` per "
            "adapter"
        )
    if a != (*geom.a_shape, r) or b != (*geom.lead_shape, r, *geom.out_shape):
        raise ValueError(
            f"adapter {name!r} at '{path}': a {a}, b {b} do not fit the layer (input axes "
            f"{geom.in_shape}, output axes {geom.out_shape}: want a (..., r), b (r, ...)). Was "
            "this adapter made for another base model?"
        )


class MultiLoraWrapped(nn.Module):
    """A linen module computing ``base`` with several named LoRA adapters. Made by `wrap`
    with a ``{name: LoraConfig}`` mapping.

    ``variables["lora"] = {name: tree}``, ``tree`` being exactly the single-adapter tree
    (``a: (in..., r)``, ``b: (r, out...)`` per adapted layer) of that adapter's config; the
    configs may differ in rank, alpha and targets. Attributes:

    - ``adapters``: ``((name, LoraConfig), ...)`` in declared order; ``adapter_ids`` index it.
    - ``active``: the adapter name(s) whose branches are added when the call has no
      ``adapter_ids``. ``None`` (default) means the first declared adapter (PEFT's default);
      a tuple adds all of them (as PEFT with several active adapters); ``()`` is the base.
    - ``enabled``: ``False`` gives exactly the base output.

    The call takes the base's arguments plus a reserved keyword ``adapter_ids``: an int array
    ``(batch,)`` that picks each row's adapter by its index in ``adapters`` (``-1``: base
    only). One compiled function serves any mix of ids: at each layer the factors of all
    adapters are stacked ``(n, in..., r_max)``, ``(n, r_max, out...)`` (zero-padded to the
    largest rank, zero where an adapter does not adapt the layer) and gathered per row; the
    first axis of each adapted layer's input must be the batch. Concrete ids out of range raise;
    under ``jit`` they give the base output for that row.

    Only the ``Dense``/``DenseGeneral``/``Einsum`` layers are adapted (no LoRA dropout, no
    generic weights, not inside ``nn.scan``/``nn.vmap`` stacks), and the targets of each config
    are matched against paths inside the wrapped model (as a top-level `wrap`).
    """

    base: nn.Module
    adapters: tuple[tuple[str, LoraConfig], ...]
    active: str | tuple[str, ...] | None = None
    enabled: bool = True

    def setup(self) -> None:
        from .linen import share_scope

        share_scope(self, self.base)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.adapters)

    def _active(self) -> tuple[str, ...]:
        active = self.active
        if active is None:
            return self.names[:1]
        active = (active,) if isinstance(active, str) else tuple(active)
        for k in active:
            if k not in self.names:
                raise ValueError(
                    f"unknown adapter {k!r} in `active`; adapters: {_names_line(self.names)}"
                )
        _check_once(active)
        return active

    def __call__(self, *args: Any, adapter_ids: Any = None, **kwargs: Any) -> Any:
        active = self._active()
        if self.is_mutable_collection(COLLECTION):
            have = self.variables.get(COLLECTION, {})
            todo = [(n, c) for n, c in self.adapters if n not in have]
            if todo:
                return self._create(todo, args, kwargs)
        lora = nn.meta.unbox(dict(self.variables.get(COLLECTION, {})))
        unknown = [k for k in lora if k not in self.names]
        missing = [k for k in self.names if k not in lora]
        if unknown or missing:
            raise ValueError(
                f"the `lora` variables hold adapters {_names_line(list(lora))}, but this wrapper "
                f"declares {_names_line(self.names)}"
                + (f" (unknown: {_names_line(unknown)})" if unknown else "")
                + (f" (missing: {_names_line(missing)})" if missing else "")
                + ". Pass one tree per declared adapter (`jax_lora.add_adapter`)."
            )
        if not (self.enabled and lora_enabled()):
            return self.base(*args, **kwargs)
        ids = None if adapter_ids is None else check_ids(adapter_ids, len(self.names))
        interceptor = _Multi(self, lora, ids, active)
        with nn.intercept_methods(interceptor):
            out = self.base(*args, **kwargs)
        for k in self.names:
            for p, _ in factor_nodes(lora[k]):
                if (k, tuple(p)) not in interceptor.used:
                    raise ValueError(
                        f"adapter {k!r} has factors at '{path_str(p)}', but no Dense, "
                        "DenseGeneral or Einsum layer there was called. Was it made for another "
                        "model (or for a non-Dense weight, which named adapters do not adapt)?"
                    )
        return out

    def _create(self, todo, args, kwargs) -> Any:
        """Make the missing adapters' trees, each as `init_lora` would for its config."""
        from .linen import LoraWrapped, init_lora

        out = self.base(*args, **kwargs)
        rest = {k: v for k, v in self.variables.items() if k != COLLECTION}
        for name, config in todo:
            key = self.make_rng("params")
            base = self.base.unbind()[0]  # a fresh unbound copy for each nested `apply`
            tree = init_lora(
                LoraWrapped(base=base, config=config, parent=None), key, rest, *args, **kwargs
            )
            self.put_variable(COLLECTION, name, tree)
        return out

    def with_adapter(self, name: str, config: LoraConfig) -> MultiLoraWrapped:
        """A copy that also declares adapter ``name`` (create its tree with `jax_lora.init_lora`
        on ``{"params": ...}`` and a one-adapter wrapper, or with ``apply(...,
        mutable=["lora"])``, then `add_adapter`)."""
        _check_name(name)
        if name in self.names:
            raise ValueError(f"adapter {name!r} is already declared")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"adapter {name!r}: config must be a LoraConfig, got {config!r}")
        return self.clone(adapters=(*self.adapters, (name, config)))

    def without_adapter(self, name: str) -> MultiLoraWrapped:
        """A copy that no longer declares adapter ``name`` (ids of later adapters shift by 1)."""
        if name not in self.names:
            raise KeyError(f"no adapter {name!r}; adapters: {_names_line(self.names)}")
        active = self.active
        if isinstance(active, str):
            active = None if active == name else active
        elif active is not None:
            active = tuple(k for k in active if k != name)
        return self.clone(adapters=tuple(p for p in self.adapters if p[0] != name), active=active)


def wrap_adapters(
    module: Any,
    configs: Mapping[str, LoraConfig],
    *,
    name: str | None = None,
    rngs: nnx.Rngs | None = None,
    stack_axis: int | None = None,
) -> Any:
    """Named adapters ``configs`` (``{name: LoraConfig}``, in this order) on ``module``:
    a `MultiLoraWrapped` for a linen module, or an NNX model adapted in place (see
    `wrap_nnx_adapters`; ``stack_axis`` as in `jax_lora.nnx.wrap_nnx`, NNX only).
    ``jax_lora.wrap(module, {...})`` calls this."""
    if isinstance(module, nnx.Module):
        return wrap_nnx_adapters(module, configs, rngs=rngs, stack_axis=stack_axis)
    if not isinstance(module, nn.Module):
        raise TypeError(
            "named adapters ({name: LoraConfig}) take a flax.linen.Module or an nnx.Module; "
            f"got {type(module).__name__}"
        )
    pairs = _check_configs(configs)
    if isinstance(module, MultiLoraWrapped):
        raise ValueError("this module already has named adapters; use `with_adapter` to add one")
    return MultiLoraWrapped(base=module.clone(parent=None), adapters=tuple(pairs), name=name)


def _check_configs(configs: Mapping[str, LoraConfig]) -> list[tuple[str, LoraConfig]]:
    if not isinstance(configs, Mapping) or not configs:
        raise ValueError("named adapters need a non-empty {name: LoraConfig} mapping")
    pairs = []
    for k, c in configs.items():
        _check_name(k)
        if not isinstance(c, LoraConfig):
            raise TypeError(
                "`config` must be a jax_lora.LoraConfig, or {name: LoraConfig} for named "
                f"adapters; adapter {k!r} got {c!r}"
            )
        if c.dropout > 0:
            raise ValueError(
                f"adapter {k!r}: named adapters do not run LoRA dropout yet (`dropout`="
                f"{c.dropout}); use dropout=0.0"
            )
        if c.use_dora:
            raise ValueError(
                f"adapter {k!r}: named adapters do not run DoRA yet (`use_dora`=True); use a "
                "single-adapter `wrap` for a DoRA adapter"
            )
        pairs.append((k, c))
    return pairs


# --- weighted combination (PEFT's add_weighted_adapter) ---------------------------------------


def _rank_axis(nodes: Sequence[Mapping[str, Any]], path: str) -> int:
    """The position of the rank axis in ``b`` (= number of lead axes) that fits all nodes."""
    shapes = [(tuple(np.shape(n["a"])), tuple(np.shape(n["b"]))) for n in nodes]
    # a has >= 1 input axis and b >= 1 output axis besides the k lead axes; the most lead axes
    # that fit wins (a stack of L layers at rank L reads as a stack, as `variants._n_lead`)
    for k in reversed(range(min(min(len(a), len(b)) for a, b in shapes) - 1)):
        if all(b[k] == a[-1] and a[:k] == b[:k] for a, b in shapes):
            return k
    raise ValueError(f"the factors at '{path}' are not a (lead..., in..., r), b (lead..., r, ...)")


def combine_adapters(
    lora: Mapping[str, Mapping[str, Any]],
    configs: Mapping[str, LoraConfig],
    weights: Mapping[str, float],
    *,
    combination: str = "svd",
    rank: int | None = None,
) -> tuple[dict[str, Any], LoraConfig]:
    """A new adapter from a weighted combination of named ones: PEFT's ``add_weighted_adapter``.

    Args:
      lora: ``{name: tree}`` (``variables["lora"]`` of a `MultiLoraWrapped`).
      configs: ``{name: LoraConfig}`` for (at least) the combined adapters.
      weights: ``{name: weight}``: which adapters to combine, in this order; negative weights
        subtract.
      combination: ``"linear"``: ``a = sum_i sign_i sqrt(|w_i s_i|) a_i``,
        ``b = sum_i sqrt(|w_i s_i|) b_i`` (same rank needed; only a rough approximation of the
        weighted sum); ``"cat"``: ``a = [w_i s_i a_i]``, ``b = [b_i]`` concatenated along the
        rank (rank = sum of ranks; exact); ``"svd"``: the best rank-``rank`` approximation of
        ``sum_i w_i s_i a_i b_i`` (default ``rank``: the largest rank), ``a = U``,
        ``b = diag(S) V^T``. ``s_i`` is each adapter's scale at that layer (``alpha_pattern``
        and ``rank_pattern`` count).
      rank: the svd rank (default: the largest of the adapters' ranks at each layer).

    Returns:
      ``(tree, config)``: the new adapter's factors on every layer any of them adapts, and its
      config: rank as above, ``alpha = rank`` (scale 1, as PEFT), ``targets`` naming exactly
      those layers (paths escaped, as `import_peft` does); layers whose rank differs from the
      largest (``rank_pattern`` in the inputs) get pinned ``rank_pattern``/``alpha_pattern``
      entries.
    """
    if combination not in COMBINATIONS:
        raise ValueError(f"`combination` must be one of {COMBINATIONS}, got {combination!r}")
    names = list(weights)
    if not names:
        raise ValueError("`weights` is empty: name at least one adapter")
    for k in names:
        if k not in lora or k not in configs:
            where = "lora" if k not in lora else "configs"
            raise KeyError(f"no adapter {k!r} in `{where}`; adapters: {_names_line(list(lora))}")
    for k in names:
        w = weights[k]
        try:
            ok = not isinstance(w, bool) and np.ndim(w) == 0 and math.isfinite(float(w))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"`weights`[{k!r}] must be a finite number, got {w!r}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ValueError(f"`rank` must be an int >= 1 or None, got {rank!r}")
    if len(names) == 1:
        combination = "linear"
    by_path: dict[tuple[str, ...], dict[str, Mapping[str, Any]]] = {}
    for k in names:
        for p, node in factor_nodes(nn.meta.unbox(lora[k])):
            by_path.setdefault(tuple(p), {})[k] = node
    out: dict[str, Any] = {}
    new_ranks: dict[str, int] = {}
    for p, nodes in by_path.items():
        path = path_str(p)
        here = [k for k in names if k in nodes]
        # each layer's own scale and rank (alpha_pattern / rank_pattern), not the config's default
        ws = [float(weights[k]) * configs[k].scale_for(path) for k in here]
        n_lead = _rank_axis([nodes[k] for k in here], path)
        a_s = [jnp.asarray(nodes[k]["a"]) for k in here]
        b_s = [jnp.asarray(nodes[k]["b"]) for k in here]
        dtype = a_s[0].dtype
        if combination == "linear":
            got = {k: int(t.shape[-1]) for k, t in zip(here, a_s, strict=True)}
            if len(set(got.values())) != 1:
                raise ValueError(
                    f"`linear` needs adapters of one rank, but at '{path}' the ranks are {got}; "
                    "use 'cat' or 'svd'"
                )
            new_rank = a_s[0].shape[-1]
            wa = [math.copysign(math.sqrt(abs(w)), w) for w in ws]
            wb = [math.sqrt(abs(w)) for w in ws]
            a = sum(jnp.asarray(w, t.dtype) * t for w, t in zip(wa, a_s, strict=True))
            b = sum(jnp.asarray(w, t.dtype) * t for w, t in zip(wb, b_s, strict=True))
        elif combination == "cat":
            # adapters absent here leave zeros at the end (as PEFT): every layer gets the rank
            # sum of all the combined adapters' ranks there
            new_rank = sum(configs[k].rank_for(path) for k in names)
            a = jnp.concatenate(
                [jnp.asarray(w, t.dtype) * t for w, t in zip(ws, a_s, strict=True)], axis=-1
            )
            b = jnp.concatenate(b_s, axis=n_lead)
            pad = new_rank - a.shape[-1]
            if pad < 0:
                raise ValueError(
                    f"the factors at '{path}' have rank {a.shape[-1]} in all, more than the "
                    f"configs' ranks there ({new_rank}): were they made with other configs?"
                )
            a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)])
            b = jnp.pad(b, [(0, 0)] * n_lead + [(0, pad)] + [(0, 0)] * (b.ndim - n_lead - 1))
        else:
            new_rank = rank or max(configs[k].rank_for(path) for k in names)
            a, b = _svd(a_s, b_s, ws, n_lead, new_rank, path)
        new_ranks[path] = int(new_rank)
        node = out
        for part in p:
            node = node.setdefault(part, {})
        node.update(a=a.astype(dtype), b=b.astype(dtype))
    if not new_ranks:
        raise ValueError(f"the adapters {_names_line(names)} have no factors to combine")
    first = configs[names[0]]
    top = max(new_ranks.values())
    # layers whose rank differs get a pinned rank_pattern entry (alpha = rank: scale 1 everywhere)
    odd = {"^" + re.escape(p): r for p, r in new_ranks.items() if r != top}
    config = LoraConfig(
        rank=top,
        alpha=top,
        targets=sorted(re.escape(p) for p in new_ranks),
        param_dtype=first.param_dtype,
        rank_pattern=odd,
        alpha_pattern={k: float(r) for k, r in odd.items()},
    )
    return out, config


def _svd(a_s, b_s, ws, n_lead: int, rank: int, path: str):
    """Best rank-``rank`` factors of ``sum_i w_i a_i @ b_i`` per lead index (fp32 or wider)."""
    a0, b0 = a_s[0], b_s[0]
    lead, ins, outs = a0.shape[:n_lead], a0.shape[n_lead:-1], b0.shape[n_lead + 1 :]
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    if rank > min(fan_in, fan_out):
        raise ValueError(
            f"svd `rank`={rank} is larger than min(fan_in, fan_out)={min(fan_in, fan_out)} at "
            f"'{path}'"
        )
    dtype = jnp.promote_types(a0.dtype, jnp.float32)
    delta = sum(
        jnp.asarray(w, dtype)
        * jnp.matmul(
            a.astype(dtype).reshape(*lead, fan_in, a.shape[-1]),
            b.astype(dtype).reshape(*lead, b.shape[n_lead], fan_out),
            precision=lax.Precision.HIGHEST,
        )
        for w, a, b in zip(ws, a_s, b_s, strict=True)
    )
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    a = u[..., :rank].reshape(*lead, *ins, rank)
    b = (s[..., :rank, None] * vt[..., :rank, :]).reshape(*lead, rank, *outs)
    return a, b


# --- PEFT's one-folder-per-adapter layout ----------------------------------------------------


def export_peft_adapters(
    directory: str | os.PathLike,
    lora: Mapping[str, Mapping[str, Any]],
    configs: Mapping[str, LoraConfig],
    *,
    overwrite: bool = False,
    **kwargs: Any,
) -> None:
    """Write several adapters as PEFT's ``save_pretrained`` does: adapter ``"default"`` in
    ``directory`` itself, every other one in ``directory/<name>``; load them in PEFT with
    ``PeftModel.from_pretrained(model, directory/<first>, adapter_name=<first>)`` and
    ``load_adapter(directory/<name>, adapter_name=<name>)``.

    The whole folder is written aside and swapped in at the end (`export_peft`'s atomic
    replace): a failed export leaves what was there. An existing ``directory`` that holds
    anything is refused unless ``overwrite=True``. ``kwargs`` go to every `export_peft` call
    (``torch_name``, ``stacked``, ...).
    """
    from .peft import _fsync, _swap, export_peft

    names = list(lora)
    if not names:
        raise ValueError("no adapters to export: `lora` is empty ({name: tree} expected)")
    for k in names:
        _check_name(k)
        if k not in configs:
            raise KeyError(f"no config for adapter {k!r} in `configs`")
    directory = os.path.realpath(os.fspath(directory))
    if os.path.lexists(directory):
        if not os.path.isdir(directory):
            raise ValueError(f"{directory} exists and is not a folder")
        if os.listdir(directory) and not overwrite:
            raise ValueError(
                f"{directory} is not empty; export_peft_adapters replaces the whole folder, so "
                "it refuses. Export to a new folder, or pass overwrite=True."
            )
    parent, base = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{base}.peft-adapters-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.mkdir(tmp)
        for k in sorted(names, key=lambda k: k != "default"):  # the root folder first
            target = tmp if k == "default" else os.path.join(tmp, k)
            export_peft(target, lora[k], configs[k], overwrite=True, **kwargs)
        if os.path.lexists(directory):
            _swap(tmp, directory)
        else:
            os.rename(tmp, directory)
        _fsync(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_peft_adapters(
    directory: str | os.PathLike, *, names: Sequence[str] | None = None, **kwargs: Any
) -> tuple[dict[str, Any], dict[str, LoraConfig]]:
    """Read PEFT's multi-adapter folder (see `export_peft_adapters`): ``directory`` itself as
    ``"default"`` when it holds an adapter, and each subfolder that holds one by its name.

    Returns ``({name: tree}, {name: LoraConfig})``; ``names`` picks (and orders) adapters.
    ``kwargs`` go to every `import_peft` call (``flax_path``, ``like`` (one adapter's tree)...).
    """
    from .peft import CONFIG, WEIGHTS, import_peft

    directory = os.fspath(directory)
    found = {"default": directory} if os.path.isfile(os.path.join(directory, CONFIG)) else {}
    broken = []  # weights without a config: a half-written or damaged adapter folder
    for entry in sorted(os.listdir(directory)):
        sub = os.path.join(directory, entry)
        if entry.startswith("."):
            continue
        if os.path.isfile(os.path.join(sub, CONFIG)):
            if entry in found:
                raise ValueError(
                    f"two adapters named {entry!r} in {directory}: the folder itself and its "
                    f"subfolder {entry!r}; move one of them"
                )
            found[entry] = sub
        elif os.path.isfile(os.path.join(sub, WEIGHTS)):
            broken.append(entry)
    if not found and not broken:
        raise FileNotFoundError(
            f"no PEFT adapter in {directory}: neither it nor a subfolder holds {CONFIG}"
        )
    if names is None and broken:
        raise ValueError(
            f"adapter folder(s) {_names_line(broken)} in {directory} hold {WEIGHTS} but no "
            f"{CONFIG} (an incomplete export?); restore the config, or pick the other adapters "
            "with `names=`"
        )
    pick = list(found) if names is None else list(names)
    for k in pick:
        if k not in found:
            raise KeyError(f"no adapter {k!r} in {directory}; found: {_names_line(list(found))}")
    trees, configs = {}, {}
    for k in pick:
        trees[k], configs[k] = import_peft(found[k], **kwargs)
    return trees, configs


# --- NNX ------------------------------------------------------------------------------------

_IDS: contextvars.ContextVar[Any] = contextvars.ContextVar("jax_lora_adapter_ids", default=None)


@contextlib.contextmanager
def adapter_ids(ids: Any) -> Iterator[None]:
    """NNX: inside this block, layers with named adapters route row ``i`` of their input to
    adapter ``ids[i]`` (an int array ``(batch,)``, index into the declared names, ``-1``: base
    only). Read when the model is called (or traced): enter it inside your jitted function,
    ``with jax_lora.adapter_ids(ids): y = model(x)`` (concrete ids entered outside a ``jit`` that
    calls the model raise: the compiled function would keep them). (linen: the ``adapter_ids=``
    keyword.)"""
    token = _IDS.set((ids, _under_jit()))
    try:
        yield
    finally:
        _IDS.reset(token)


def _under_jit() -> bool:
    check = getattr(jax.extend.core, "unsafe_am_i_under_a_jit_DO_NOT_USE", None)
    return bool(check()) if check is not None else False


def _ids_in_call() -> Any:
    """The ids of the enclosing `adapter_ids` block, refusing concrete ids entered outside the
    ``jit`` now tracing: they would be baked into the compiled function, and its cache would
    serve them for every later call whatever ids the block then holds."""
    got = _IDS.get()
    if got is None:
        return None
    ids, entered_under_jit = got
    if not entered_under_jit and not isinstance(ids, jax.core.Tracer) and _under_jit():
        raise ValueError(
            "`jax_lora.adapter_ids(ids)` was entered outside the traced function (jit, or scan, "
            "remat, eval_shape) that calls the model: a jit would compile its concrete ids in "
            "and reuse them for other ids. Pass the ids as an argument and enter the block "
            "inside the jitted function: `with jax_lora.adapter_ids(ids): y = model(x)`"
        )
    return ids


class _MultiNnx(nnx.Module):
    """The named-adapter ``__call__`` in front of an NNX Dense-family layer class. Set per layer
    by `wrap_nnx_adapters`: ``lora_adapters`` (``{name: {"a", "b"}}`` of ``nnx.LoRAParam``, only
    the adapters that adapt this layer), ``lora_names`` (all declared names, the id order),
    ``lora_scales``, ``lora_active`` and ``lora_path``."""

    def __call__(self, inputs: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
        from .nnx import _call_geometry

        y = super().__call__(inputs, *args, **kwargs)  # type: ignore[misc]
        if not lora_enabled():
            return y
        geom = _call_geometry(self, inputs, args, kwargs)  # type: ignore[arg-type]
        nodes = {k: {"a": v["a"][...], "b": v["b"][...]} for k, v in self.lora_adapters.items()}
        x = inputs.astype(y.dtype)
        ids = _ids_in_call()
        precision = getattr(self, "precision", None)
        if ids is None:
            for k in self.lora_active:
                if k in nodes:
                    a, b = nodes[k]["a"], nodes[k]["b"]
                    y = y + factors.branch(x, a, b, geom, self.lora_scales[k], precision)
            return y
        ids = check_ids(ids, len(self.lora_names))
        scales = [self.lora_scales[k] for k in self.lora_names]
        return y + gathered_branch(
            x, nodes, self.lora_names, scales, ids, geom, self.lora_path, precision
        )


class MultiLinear(_MultiNnx, nnx.Linear):
    """``nnx.Linear`` with named adapters. Made in place by `wrap_nnx_adapters`."""


class MultiLinearGeneral(_MultiNnx, nnx.LinearGeneral):
    """``nnx.LinearGeneral`` with named adapters. Made in place by `wrap_nnx_adapters`."""


class MultiEinsum(_MultiNnx, nnx.Einsum):
    """``nnx.Einsum`` with named adapters. Made in place by `wrap_nnx_adapters`."""


_MULTI_NNX = {
    nnx.Linear: MultiLinear,
    nnx.LinearGeneral: MultiLinearGeneral,
    nnx.Einsum: MultiEinsum,
}


def wrap_nnx_adapters(
    model: nnx.Module,
    configs: Mapping[str, LoraConfig],
    *,
    rngs: nnx.Rngs | None = None,
    stack_axis: int | None = None,
) -> nnx.Module:
    """Named adapters on an initialised NNX model, in place; returns ``model``.

    Each adapter's layers and factors are what `jax_lora.wrap(model, config)` would make
    (found on a clone). Each adapted ``nnx.Linear``/``LinearGeneral``/``Einsum`` becomes
    `MultiLinear`/... holding ``lora_adapters = {name: {"a", "b"}}`` (``nnx.LoRAParam``; train
    them with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``). Calls use the first adapter
    (`set_active_adapters` picks others); inside ``with jax_lora.adapter_ids(ids):`` row ``i`` uses
    adapter ``ids[i]``. `adapters_state` gives ``{name: lora tree}``. ``stack_axis``: as in
    `jax_lora.nnx.wrap_nnx` (``0`` where a leading stack's shape fits several axes); stacks along
    a non-leading axis are refused.
    """
    from .nnx import _modules, adapted_layers, lora_state, wrap_nnx

    pairs = _check_configs(configs)
    names = tuple(k for k, _ in pairs)
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    modules = dict(_modules(model))
    if any(isinstance(m, _MultiNnx) for m in modules.values()):
        raise ValueError("this model already has named adapters")
    trees: dict[str, dict] = {}
    for k, config in pairs:  # everything is checked before the model changes
        clone = nnx.clone(model)
        wrap_nnx(clone, config, rngs=rngs, stack_axis=stack_axis)
        for path, layer in adapted_layers(clone):
            base = type(modules[path])
            if getattr(layer, "lora_stack_axis", None) is not None:  # (jax_lora.nnx.wrap_nnx)
                raise ValueError(
                    f"'{path}' is stacked along axis {layer.lora_stack_axis % layer.kernel.ndim} "
                    f"(kernel {tuple(layer.kernel.shape)}): named adapters follow stacks along "
                    "leading axes only (`nnx.vmap`'s default `out_axes=0`)"
                )
            if base not in _MULTI_NNX:
                raise ValueError(
                    f"adapter {k!r} adapts '{path}' ({base.__name__}); named adapters adapt "
                    "nnx.Linear, nnx.LinearGeneral and nnx.Einsum layers only"
                )
        trees[k] = lora_state(clone)
    by_path: dict[str, dict[str, Mapping[str, Any]]] = {}
    for k, tree in trees.items():
        for p, node in factor_nodes(tree):
            by_path.setdefault(path_str(p), {})[k] = node
    configs = dict(pairs)
    for path, nodes in by_path.items():
        layer = modules[path]
        layer.lora_adapters = nnx.data(
            {
                k: {"a": nnx.LoRAParam(node["a"]), "b": nnx.LoRAParam(node["b"])}
                for k, node in nodes.items()
            }
        )
        layer.lora_names = names
        layer.lora_scales = {k: c.scale_for(path) for k, c in configs.items()}  # alpha_pattern
        layer.lora_active = names[:1]
        layer.lora_path = path
        object.__setattr__(layer, "__class__", _MULTI_NNX[type(layer)])
    return model


def _multi_layers(model: nnx.Module) -> list[tuple[str, _MultiNnx]]:
    from .nnx import _modules

    layers = [(p, m) for p, m in _modules(model) if isinstance(m, _MultiNnx)]
    if not layers:
        raise ValueError("this NNX model has no named adapters (see `wrap_nnx_adapters`)")
    return layers


def set_active_adapters(model: nnx.Module, active: str | Sequence[str]) -> nnx.Module:
    """NNX: the adapter(s) whose branches run outside `adapter_ids` (several add up; ``()`` is
    the base), in place; returns ``model``. (linen: ``wrapped.clone(active=...)``.)"""
    active = (active,) if isinstance(active, str) else tuple(active)
    _check_once(active)
    for _, layer in _multi_layers(model):
        for k in active:
            if k not in layer.lora_names:
                raise ValueError(
                    f"unknown adapter {k!r}; adapters: {_names_line(layer.lora_names)}"
                )
        layer.lora_active = active
    return model


def adapters_state(model: nnx.Module) -> dict[str, dict[str, Any]]:
    """NNX: ``{name: lora tree}`` of a model with named adapters (the linen layout)."""
    out: dict[str, dict[str, Any]] = {}
    layers = _multi_layers(model)
    for k in layers[0][1].lora_names:
        out[k] = {}
    for path, layer in layers:
        for k, node in layer.lora_adapters.items():
            at = out[k]
            for part in path.split("/") if path else []:
                at = at.setdefault(part, {})
            at.update(a=node["a"][...], b=node["b"][...])
    return out
