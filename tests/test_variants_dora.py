"""PiSSA / OLoRA initialisation of a DoRA adapter (PEFT: ``init_lora_weights="pissa"`` with
``use_dora=True``): the magnitude restarts at ``‖W‖`` (= ‖W_res + s·a@b‖), so the model's output
is unchanged at the start, as in PEFT (``dora_init`` runs after ``pissa_init``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_lora


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(12, name="fc")(x)  # (in 8, out 12): norm over the input axis 0
        h = h.reshape(h.shape[0], 3, 4, 1)
        return nn.Conv(5, (2, 2), name="conv")(h)  # (2, 2, 1, 5): norm over axes (0, 1, 2)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_linen_dora_magnitude_is_the_weight_norm_and_output_unchanged(method):
    cfg = jax_lora.LoraConfig(rank=2, alpha=4.0, targets="fc|conv", use_dora=True)
    wrapped = jax_lora.wrap(_Net(), cfg)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    v = wrapped.init(jax.random.key(0), x)
    params = jax.tree.map(lambda w: w * 3.0 + 0.5, v["params"])  # "pretrained": not the init
    base = _Net().apply({"params": params}, x)
    lora, residual = jax_lora.init_from_weights(
        {"params": params, "lora": v["lora"]}, wrapped, x, method=method
    )
    want_fc = np.linalg.norm(np.asarray(params["fc"]["kernel"], np.float64), axis=0)
    k = np.asarray(params["conv"]["kernel"], np.float64)
    want_conv = np.sqrt((k**2).sum(axis=(0, 1, 2)))
    np.testing.assert_allclose(lora["fc"]["m"], want_fc, rtol=1e-6)
    np.testing.assert_allclose(lora["conv"]["kernel"]["m"], want_conv, rtol=1e-6)
    y = wrapped.apply({"params": residual, "lora": lora}, x)
    np.testing.assert_allclose(y, base, atol=2e-5 * float(jnp.abs(base).max()))


def test_nnx_dora_pissa_magnitude_and_output():
    model = nnx.Linear(8, 12, rngs=nnx.Rngs(0))
    cfg = jax_lora.LoraConfig(rank=2, alpha=4.0, use_dora=True)
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1))
    model.kernel[...] = model.kernel[...] * 3.0 + 0.5  # pretrained weights loaded after wrap
    x = jax.random.normal(jax.random.key(1), (3, 8))
    with jax_lora.disabled():
        base = model(x)
    w = np.asarray(model.kernel[...], np.float64)
    jax_lora.init_from_weights(model, method="pissa")
    np.testing.assert_allclose(model.lora_m[...], np.linalg.norm(w, axis=0), rtol=1e-6)
    np.testing.assert_allclose(model(x), base, atol=2e-5 * float(jnp.abs(base).max()))
