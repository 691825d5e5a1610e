"""`jax-lora train --quant nf4_b32_dq` (`jax_lora.lm.models.quantize_base`): NF4 in blocks of 32
with double-quantized scales (4.25 bits a weight), the lowest-perplexity 4-bit base measured on
SmolLM2 (README, QLoRA); every linear kernel, and nothing else, quantized that way."""

import jax
import numpy as np

from jax_lora import quant
from jax_lora.lm import llama, models

CFG = llama.LlamaConfig(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_nf4_b32_dq_quantizes_every_kernel_in_blocks_of_32_with_double_quant():
    ids = np.zeros((1, 4), np.int32)
    params = llama.Llama(CFG).init(jax.random.key(0), ids)["params"]
    q = models.quantize_base(params, "nf4_b32_dq")
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    qflat = dict(jax.tree_util.tree_flatten_with_path(q, is_leaf=quant.is_quantized)[0])
    kernels = 0
    for kp, x in flat:
        y = qflat[kp]
        if kp[-1].key != "kernel":
            assert not quant.is_quantized(y) and np.array_equal(y, x), kp
            continue
        kernels += 1
        assert quant.is_quantized(y) and y.qtype == "nf4" and y.block == 32, (kp, y)
        assert y.scales_offset is not None, kp  # double-quantized scales
        ref = quant.quantize_array(x, "nf4", block=32, double_quant=True)
        np.testing.assert_array_equal(y.codes, ref.codes)
        np.testing.assert_array_equal(quant.dequantize_array(y), quant.dequantize_array(ref))
    assert kernels == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert (
        models.quantize_base(params, "nf4_dq")["model"]["layers_0"]["mlp"]["up_proj"][
            "kernel"
        ].block
        == 64
    )
