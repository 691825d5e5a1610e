"""The QLoRA step's compiled temporaries: a quantized base holds no more than the float base's
step plus what it dequantizes at a time, with the same loss and gradients (a small scanned,
rematerialised Llama, as `benchmarks/quant.py` runs SmolLM2)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_lora
from jax_lora import quant
from jax_lora.lm import llama
from jax_lora.lm import loss as lm_loss

D, F, L = 64, 128, 3  # hidden, MLP width, layers
B, T = 4, 128  # 512 tokens: activations (512 x F fp32 = 256 KiB) dwarf a kernel (D x F: 32 KiB)
CFG = llama.LlamaConfig(
    vocab_size=256,
    hidden_size=D,
    intermediate_size=F,
    num_hidden_layers=L,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=T,
)
TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"


def _setup():
    model = llama.Llama(CFG, remat=True, scan_layers=True)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    params = jax.tree.map(lambda x: x * 0.5 if x.ndim >= 2 else x, params)
    qparams = quant.quantize(params, "nf4")
    fparams = quant.dequantize(qparams)  # the same values in fp32: the float-base reference
    wrapped = jax_lora.wrap(model, jax_lora.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": fparams}, ids)
    lora = jax.tree.map(lambda x: x + 0.01, lora)  # b != 0: every factor gets a gradient
    batch = jax.random.randint(jax.random.key(2), (B, T + 1), 0, CFG.vocab_size)

    def nll(lora, params, batch):
        v = {"params": params, "lora": lora}
        return lm_loss.llama_token_nll(
            wrapped.apply, v, batch[:, :-1], batch[:, 1:], chunk=128
        ).mean()

    step = jax.jit(jax.value_and_grad(nll), compiler_options=lm_loss.cpu_remat_compiler_options)
    return step, lora, qparams, fparams, batch


@pytest.fixture(scope="module")
def setup():
    return _setup()


def _temp_bytes(step, *args) -> int:
    return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_qlora_step_temporaries_within_float_step_plus_one_layers_kernels(setup):
    """On a float base the kernels are arguments; on a quantized one each layer's kernels are
    dequantized (temporaries) while it runs, forward and backward, one layer at a time. So the
    QLoRA step may hold at most the float step's temporaries plus one layer's dequantized
    kernels (q, k, v, o, gate, up, down in fp32: 2 D^2 + 2 D D/2 + 3 D F floats = 144 KiB) --
    not anything the size of a layer's activations: the zero cotangent of the element of each
    layer's input that orders the dequantization (`quant.input_marker`) used to be padded to
    the input's shape, hoisted out of the scan and kept alive for the whole backward pass
    (tokens x (D + F) fp32 = 384 KiB here; 8.25 MiB for SmolLM2 at batch 4, seq 256)."""
    step, lora, qparams, fparams, batch = setup
    float_temps = _temp_bytes(step, lora, fparams, batch)
    q_temps = _temp_bytes(step, lora, qparams, batch)
    one_layer = 4 * (2 * D * D + 2 * D * (D // 2) + 3 * D * F)
    assert q_temps <= float_temps + one_layer, (q_temps, float_temps, one_layer)


def test_qlora_step_loss_and_grads_equal_the_float_base(setup):
    """The same loss and LoRA gradients as the dequantized float base (fp32: the dequantized
    kernels are bit-identical, only XLA's fusion order may differ: 1e-5 relative)."""
    step, lora, qparams, fparams, batch = setup
    lq, gq = step(lora, qparams, batch)
    lf, gf = step(lora, fparams, batch)
    np.testing.assert_allclose(float(lq), float(lf), rtol=1e-6)
    assert jax.tree.structure(gq) == jax.tree.structure(gf)
    for a, b in zip(jax.tree.leaves(gq), jax.tree.leaves(gf), strict=True):
        assert float(jnp.max(jnp.abs(b))) > 0  # a real gradient, not an all-zero one
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
