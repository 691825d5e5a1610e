"""DoRA and quantizing the base: the order must not matter at init.

PEFT's order is quantize, then wrap: DoRA's magnitude ``m = ‖W_q + s·a@b‖`` is measured on the
weight the layer computes with (the dequantized one; `peft.tuners.lora.dora` dequantizes a bnb
weight for it), so a fresh adapter leaves the quantized model unchanged. Wrapping first and then
quantizing the NNX model must give the same: a magnitude still at its init for the float weight
is re-measured on the dequantized one; a trained magnitude is the adapter's and is kept.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import quant

# nf4 moves ‖W‖ by ~1 % per column; at init the DoRA output must equal the quantized base's
# to fp32 rounding of m / ‖·‖ (relative 1e-6).
TOL = 1e-6
D = 64


class Net(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, (3,), rngs=rngs)
        self.head = nnx.Linear(D, 8, rngs=rngs)

    def __call__(self, x):  # x: (B, T, D)
        h = jnp.tanh(self.fc(x))
        return self.head(jnp.tanh(self.conv(h)))


X = jax.random.normal(jax.random.key(3), (2, 5, D))
CFG = jax_lora.LoraConfig(rank=4, alpha=8, targets=["fc", "conv/kernel", "head"], use_dora=True)


def _quantized_base(model):
    with jax_lora.disabled():
        return model(X)


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_nnx_wrap_then_quantize_starts_at_the_quantized_base(qtype):
    # bug: m stayed ‖W_float‖, so the fresh DoRA model differed from its base by ~1 % (nf4)
    model = jax_lora.wrap(Net(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    jax_lora.quantize(model, qtype)
    assert quant.is_quantized(model.conv.kernel.get_value())
    base = _quantized_base(model)
    assert_close(model(X), base, TOL)
    # the same magnitudes as PEFT's order (quantize, then wrap)
    other = jax_lora.wrap(jax_lora.quantize(Net(nnx.Rngs(0)), qtype), CFG, rngs=nnx.Rngs(1))
    assert_close(jax_lora.lora_state(model), jax_lora.lora_state(other), TOL)
    assert_close(other(X), base, TOL)


def test_nnx_trained_magnitude_is_kept():
    model = jax_lora.wrap(Net(nnx.Rngs(0)), CFG, rngs=nnx.Rngs(1))
    lora = jax_lora.lora_state(model)
    lora["fc"]["m"] = lora["fc"]["m"] * 1.01  # a step of training moved it
    jax_lora.load_lora(model, lora)
    jax_lora.quantize(model, "nf4")
    after = jax_lora.lora_state(model)
    np.testing.assert_array_equal(np.asarray(after["fc"]["m"]), np.asarray(lora["fc"]["m"]))
    # untouched ones were re-measured on the dequantized weight
    w = quant.dequantize_array(model.head.kernel.get_value())
    assert_close(after["head"]["m"], jnp.linalg.norm(w, axis=0), TOL)
    assert np.abs(np.asarray(after["head"]["m"] - lora["head"]["m"])).max() > 1e-4


class Stack(nnx.Module):
    """``n`` Linear(D, D) blocks stacked along ``axis`` by ``nnx.vmap``, run by ``nnx.scan``."""

    def __init__(self, n, axis, rngs):
        self.axis = axis

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=axis)
        def create(rngs):
            return nnx.Linear(D, D, rngs=rngs)

        self.fc = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
        def body(x, fc):
            return jnp.tanh(fc(x))

        return body(x, self.fc)


@pytest.mark.parametrize("order", ["wrap_then_quantize", "quantize_then_wrap"])
@pytest.mark.parametrize("axis", [0, 1])
def test_nnx_stacked_dora_on_a_quantized_base_starts_at_the_quantized_base(axis, order):
    """Stacks along the leading axis and along axis 1 (`stack_axis`, tests/test_nnx_stack_axis)."""
    model, cfg = Stack(3, axis, nnx.Rngs(0)), dataclasses.replace(CFG, targets=["fc"])
    qaxis = -2 if axis == 0 else 0  # blocks along `in`
    if order == "quantize_then_wrap":
        jax_lora.quantize(model, "int8", axis=qaxis)
    jax_lora.wrap(model, cfg)
    if order == "wrap_then_quantize":
        jax_lora.quantize(model, "int8", axis=qaxis)
    assert_close(model(X), _quantized_base(model), TOL)
    m = jax_lora.lora_state(model)["fc"]["m"]  # stack-first (3, D): ‖dequantized W‖ per layer
    w = jnp.moveaxis(quant.dequantize_array(model.fc.kernel.get_value()), axis, 0)
    assert_close(m, jnp.linalg.norm(w, axis=1), TOL)


# ----------------------------------------------------------------------------------- linen


class LNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="head")(jnp.tanh(nn.Dense(D, name="fc")(x)))


def test_linen_quantize_then_init_lora_starts_at_the_quantized_base():
    """linen's `quantize` sees only the params, not the ``lora`` collection holding ``m``: the
    documented order is PEFT's, quantize the params then make the adapter (`init_lora`)."""
    wrapped = jax_lora.wrap(LNet(), dataclasses.replace(CFG, targets=["fc", "head"]))
    params = LNet().init(jax.random.key(0), X)["params"]
    qparams = jax_lora.quantize(params, "nf4")
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qparams}, X)
    base = LNet().apply({"params": jax_lora.dequantize(qparams)}, X)
    assert_close(wrapped.apply({"params": qparams, "lora": lora}, X), base, TOL)
    w = quant.dequantize_array(qparams["head"]["kernel"])
    assert_close(lora["head"]["m"], jnp.linalg.norm(w, axis=0), TOL)
