"""Switching LoRA off and on: the `disabled` context (linen and NNX) and `set_enabled`."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

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


def set_enabled(model: Any, enabled: bool) -> Any:
    """Switch LoRA on or off; returns the switched model (``model = set_enabled(model, False)``
    works for both).

    - NNX: flips every adapted layer of ``model`` in place (a static attribute: jit retraces)
      and returns ``model``.
    - linen: returns ``model.clone(enabled=enabled)`` for a `LoraWrapped`; linen modules are
      immutable, so ``model`` itself is unchanged.

    `jax_lora.disabled` is the context-manager form, for both.
    """
    from flax import nnx

    from .linen import LoraWrapped
    from .nnx import adapted_layers

    if isinstance(model, LoraWrapped):
        return model.clone(enabled=enabled)
    if not isinstance(model, nnx.Module):
        raise TypeError(
            "set_enabled takes an NNX model adapted by `jax_lora.wrap` or a linen `LoraWrapped`, "
            f"got {type(model).__name__}"
        )
    for _, layer in adapted_layers(model):
        layer.lora_enabled = enabled
    return model
