"""jax_lora on google-deepmind's gemma with an nf4 base (runs in the gemma venv, see
tests/test_clients_gemma.py): every einsum weight of the 2-layer Gemma3 (q, kv, attn_vec,
gating, linear) stored as a `QArray` gets its adapter exactly as on the same model with the
dequantized fp32 weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _check import assert_close
from clients import gemma_lora_test as g
from clients.gemma_lora_test import (
    LAYERS,
    SHAPES,
    adapt,
    factor_paths,
    gemma_numerics,
    get,
    logits,
    random_like,
)

import jax_lora
from jax_lora import quant

# every einsum weight; blocks of 8 along axis -2 (divides D, H and F here)
gemma = g.gemma  # the 2-layer Gemma3 fixture (model, fp32 params, tokens)
QUANTIZED = r"layer_\d/(attn/(q_einsum|kv_einsum|attn_vec_einsum)/w|mlp/(gating_einsum|linear))"


def test_nf4_base_equals_dequantized_base(gemma):
    model, params, tokens = gemma
    qparams = quant.quantize(params, "nf4", targets=QUANTIZED, block=8)
    assert quant.is_quantized(get(qparams["layer_0"], "mlp/gating_einsum"))
    dense = quant.dequantize(qparams)
    _, wrapped, lora = adapt(model, qparams, tokens)
    want_paths = sorted(f"{layer}/{w}" for layer in LAYERS for w in SHAPES)
    assert sorted(factor_paths(lora)) == want_paths
    for path, ab in factor_paths(lora).items():
        assert (ab["a"].shape, ab["b"].shape) == SHAPES[path.split("/", 1)[1]], path
    lora = random_like(lora, 5)
    got = logits(wrapped, {"params": qparams, "lora": lora}, tokens)
    want = logits(wrapped, {"params": dense, "lora": lora}, tokens)
    base = logits(model, {"params": dense}, tokens)
    assert float(jnp.abs(want - base).max()) > 1e-2  # the adapters move the logits
    assert_close(got, want, 1e-6)
    with jax_lora.disabled():
        assert_close(logits(wrapped, {"params": qparams, "lora": lora}, tokens), base, 1e-6)
    probe = jax.random.normal(jax.random.key(4), got.shape, jnp.float32)

    def grads(params):
        def loss(lora):
            return jnp.sum(logits(wrapped, {"params": params, "lora": lora}, tokens) * probe)

        return jax.jit(jax.grad(loss))(lora)

    assert_close(grads(qparams), grads(dense), 2e-6)  # (XLA's fusions round differently)
    with gemma_numerics():
        merged = jax_lora.merge({"params": qparams, "lora": lora}, wrapped, tokens)
        want_merged = jax_lora.merge({"params": dense, "lora": lora}, wrapped, tokens)
    assert not quant.has_quantized(merged)
    jax.tree.map(np.testing.assert_array_equal, merged, want_merged)
    assert_close(logits(model, {"params": merged}, tokens), got, 1e-5)
