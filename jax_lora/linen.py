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
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from . import factors
from .config import LoraConfig
from .targets import check_all_matched, explicitly_targeted, is_target, path_str, unsupported_error

COLLECTION = "lora"
"""The variable collection that holds the factors: ``variables["lora"][...path...]["a"|"b"]``."""

SUPPORTED_LINEN = (nn.Dense, nn.DenseGeneral, nn.Einsum)

_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("jax_lora_enabled", default=True)


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within this context, wrapped layers return exactly the base layer's output.

    The switch is read when a function is *traced*: call ``apply`` (or trace your jitted
    function) inside the ``with`` block. A function jitted and traced earlier with LoRA
    enabled keeps its trace; for a jitted switch use ``wrapped.clone(enabled=False)``.

    >>> import flax.linen as nn, jax, jax.numpy as jnp, jax_lora
    >>> wrapped, x = jax_lora.wrap(nn.Dense(4), jax_lora.LoraConfig(rank=2)), jnp.ones((1, 3))
    >>> variables = wrapped.init(jax.random.key(0), x)
    >>> variables["lora"]["b"] = jnp.ones((2, 4))
    >>> with jax_lora.disabled():
    ...     y_base = wrapped.apply(variables, x)
    >>> bool((y_base == nn.Dense(4).apply({"params": variables["params"]}, x)).all())
    True
    """
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def lora_enabled() -> bool:
    """Whether LoRA is enabled in the current context (see `disabled`)."""
    return _ENABLED.get()


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


def _owns_variables(module: nn.Module) -> bool:
    """A layer (owns arrays directly) as opposed to a container of sub-modules."""
    if module.scope is None:
        return False
    return any(
        not isinstance(v, Mapping) for col in module.variables.values() for v in col.values()
    )


def _factor_boxes(module: nn.Module, geom: factors.Geometry):
    """Partitioning for ``a`` and ``b`` inherited from the kernel's flax metadata, if any.

    ``a`` takes the kernel's (leading and) input-axis names and replicates the rank axis; ``b``
    replicates the rank axis and takes the output-axis names. Works for
    ``nn.with_logical_partitioning`` (logical names) and ``nn.with_partitioning`` (mesh axes).
    Returns two functions value -> boxed value (identity when the kernel carries no names).
    """
    box = module.get_variable("params", "kernel")
    names = getattr(box, "names", None)
    if not isinstance(box, nn.meta.AxisMetadata) or names is None or len(names) != box.value.ndim:
        return (lambda v: v), (lambda v: v)
    n_lead, n_in = len(geom.lead_shape), len(geom.in_shape)
    a_names = (*names[: n_lead + n_in], None)
    b_names = (*names[:n_lead], None, *names[n_lead + n_in :])
    return (
        lambda v: dataclasses.replace(box, value=v, names=a_names),
        lambda v: dataclasses.replace(box, value=v, names=b_names),
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


class _Interceptor:
    """Adds the LoRA branch to every targeted layer call; records what it saw."""

    def __init__(self, wrapper: LoraWrapped):
        self.wrapper = wrapper
        self.config = wrapper.config
        self.enabled = wrapper.enabled and lora_enabled()
        self.candidates: list[tuple[str, str]] = []
        self.containers: list[tuple[str, str]] = []
        self.used: set[tuple[str, ...]] = set()
        self.call_training: bool | None = None  # from the wrapped call's deterministic=/train=

    def __call__(self, next_fun, args, kwargs, context):
        module = context.module
        if (  # the base's own method (it shares the wrapper's scope): the wrapped call's keywords
            self.call_training is None
            and context.method_name != "setup"
            and tuple(module.path) == tuple(self.wrapper.path)
        ):
            if isinstance(kwargs.get("deterministic"), bool):
                self.call_training = not kwargs["deterministic"]
            elif isinstance(kwargs.get("train"), bool):
                self.call_training = kwargs["train"]
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = path_str(module.path)
        if not isinstance(module, SUPPORTED_LINEN):
            y = next_fun(*args, **kwargs)
            if explicitly_targeted(self.config, path):
                if _owns_variables(module):
                    raise unsupported_error(path, type(module).__name__)
                self.containers.append((path, type(module).__name__))
            return y
        self.candidates.append((path, type(module).__name__))
        if not is_target(self.config, path):
            return next_fun(*args, **kwargs)
        y = next_fun(*args, **kwargs)
        self.used.add(tuple(module.path))
        creating = module.is_mutable_collection(COLLECTION)
        if not self.enabled and not creating:
            return y
        cfg = self.config
        geom = _geometry(module, args, kwargs, path)
        if not module.has_variable(COLLECTION, "a"):
            if not creating:
                raise ValueError(
                    f"no LoRA factors for the targeted layer '{path}': the variables passed to "
                    "`apply` have no `lora` entry there. Create them with `wrapped.init` or "
                    "`jax_lora.init_lora`, or run the base module for the plain model."
                )
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
        if not self.enabled:
            return y
        x = _input(args, kwargs).astype(y.dtype)
        training = self.call_training  # the rule is documented on LoraWrapped
        if training is None and self.wrapper.deterministic is not None:
            training = not self.wrapper.deterministic
        if training is None:
            training = module.has_rng("dropout")
        if cfg.dropout > 0 and training:
            if not (module.has_rng("dropout") or module.has_rng("params")):
                raise ValueError(
                    f"LoRA dropout at '{path}' runs in training mode, but `apply` got no "
                    "'dropout' rng: pass rngs={'dropout': key}, or deterministic=True / "
                    "train=False for evaluation."
                )
            x = factors.dropout(x, cfg.dropout, module.make_rng("dropout"))
        return y + factors.branch(x, a, b, geom, cfg.scale, module.precision)


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
        nn.share_scope(self, self.base)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(lambda: self.base(*args, **kwargs))

    def call_method(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Run another method of ``base`` with LoRA:
        ``wrapped.apply(variables, "encode", x, method="call_method")``."""
        return self._run(lambda: getattr(self.base, name)(*args, **kwargs), whole_model=False)

    def _run(self, fn, whole_model: bool = True) -> Any:
        """Run ``fn`` under the interceptor. Only a whole-model call checks the targets and the
        `lora` tree against the layers it met (a method may touch some layers only)."""
        interceptor = _Interceptor(self)
        with nn.intercept_methods(interceptor):
            out = fn()
        if not whole_model:
            return out
        if self.is_mutable_collection(COLLECTION):
            check_all_matched(self.config, interceptor.candidates, interceptor.containers)
        elif interceptor.enabled:
            self._check_no_stray_factors(interceptor.used)
        return out

    def _check_no_stray_factors(self, used: set[tuple[str, ...]]) -> None:
        lora = self.variables.get(COLLECTION, {})
        n = len(self.path)
        used_rel = {p[n:] for p in used}
        for p, _ in factors.factor_nodes(lora):
            if p not in used_rel:
                raise ValueError(
                    f"the `lora` variables have factors at '{path_str(p)}', but no targeted "
                    "layer is there under this config. Were they made with other `targets` or "
                    "for another model?"
                )


def wrap(module: Any, config: LoraConfig, *, name: str | None = None, rngs: Any = None) -> Any:
    """Add LoRA to ``module``: a module transformation.

    Args:
      module: a ``flax.linen.Module`` definition (any model: the layers are found by path).
      config: the `LoraConfig` saying which layers and how.
      name: the wrapper's name when it is made inside a parent module's compact method
        (paths matched by ``targets`` then start with it).
      rngs: NNX only: ``nnx.Rngs`` for the factor init and LoRA dropout (see `wrap_nnx`).

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
    if not isinstance(config, LoraConfig):
        raise TypeError(f"`config` must be a jax_lora.LoraConfig, got {type(config).__name__}")
    from flax import nnx

    if isinstance(module, nnx.Module):
        from .nnx import wrap_nnx

        return wrap_nnx(module, config, rngs=rngs)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"jax_lora.wrap expects a flax.linen.Module or an nnx.Module, got {type(module).__name__}"
        )
    # A module made inside a parent's compact method comes attached to that parent; the
    # wrapper adopts a detached copy so that its params land under the wrapper's own name.
    return LoraWrapped(base=module.clone(parent=None), config=config, name=name)


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
