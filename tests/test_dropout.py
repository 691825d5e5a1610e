"""LoRA dropout (linen and NNX) against an independent float64 base.

LoRA dropout drops the branch input only: ``y = x @ W + bias + scale * (dropout(x) @ a) @ b``;
the base layer always sees the undropped ``x`` (as PEFT).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_lora
from jax_lora import LoraConfig

D, ROWS, P = 64, 8, 0.5


class _Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.fc(x)


def _linen(x):
    """(y in training mode, W, bias) for a linen Dense with a = b = I (scale 1)."""
    wrapped = jax_lora.wrap(nn.Dense(D), LoraConfig(rank=D, dropout=P))
    v = wrapped.init(jax.random.key(0), x)
    v["params"]["bias"] = jax.random.normal(jax.random.key(5), (D,))
    v["lora"] = {"a": jnp.eye(D), "b": jnp.eye(D)}
    y = wrapped.apply(v, x, rngs={"dropout": jax.random.key(3)})
    return y, v["params"]["kernel"], v["params"]["bias"]


def _nnx(x):
    model = _Net(nnx.Rngs(0))
    model.fc.bias[...] = jax.random.normal(jax.random.key(5), (D,))
    model = jax_lora.wrap(model, LoraConfig(rank=D, dropout=P), rngs=nnx.Rngs(3))
    jax_lora.load_lora(model, {"fc": {"a": jnp.eye(D), "b": jnp.eye(D)}})
    return model(x), model.fc.kernel[...], model.fc.bias[...]  # a fresh model trains


@pytest.mark.parametrize("run", [_linen, _nnx], ids=["linen", "nnx"])
def test_dropout_reaches_the_branch_input_only(run):
    x = jax.random.normal(jax.random.key(1), (ROWS, D))
    y, w, bias = run(x)
    xn = np.asarray(x, np.float64)
    base = xn @ np.asarray(w, np.float64) + np.asarray(bias, np.float64)  # undropped x
    r = np.asarray(y, np.float64) - base  # = dropout(x) @ I @ I: each entry 0 or x / (1 - p)
    kept_value = xn / (1 - P)
    tol = 1e-4 * (1 + np.abs(kept_value))  # fp32 matmul over D=64 terms, x ~ N(0, 1)
    dropped = np.abs(r) <= tol
    kept = np.abs(r - kept_value) <= tol
    assert (dropped | kept).all(), np.abs(np.minimum(np.abs(r), np.abs(r - kept_value))).max()
    n = ROWS * D  # keep count ~ Binomial(n, 1 - p): within 4 sigma, and something dropped
    assert abs(kept.sum() - n * (1 - P)) < 4 * np.sqrt(n * P * (1 - P)), kept.sum()
