"""`jax_lora.lm.train.eval_loss` (the CLI's evaluation loss, during `train` and in `eval`)
passes the base model to its executable as an argument: a jitted closure over the base would
bake a constant copy of the whole model into the executable (twice the base's memory)."""

import jax
import jax.numpy as jnp
import numpy as np

import jax_lora
from jax_lora.lm import llama, train

CFG = llama.LlamaConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def test_eval_loss_takes_the_base_as_an_argument_not_a_constant():
    model = llama.Llama(CFG)
    ids = jax.random.randint(jax.random.key(0), (2, 9), 0, CFG.vocab_size)
    params = model.init(jax.random.key(1), ids[:, :-1])["params"]
    wrapped = jax_lora.wrap(model, jax_lora.LoraConfig(rank=4, targets=r".*/q_proj"))
    lora = jax_lora.init_lora(wrapped, jax.random.key(2), {"params": params}, ids[:, :-1])
    mask = jnp.ones((2, 8), jnp.float32)
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    fn = train.eval_loss(wrapped, params)
    loss, count = fn(lora, ids, mask)
    ref, ref_count = train.nll(wrapped, params, lora, ids, mask)  # eager, independent of jit
    np.testing.assert_allclose(float(loss), float(ref), rtol=1e-6)
    assert float(count) == float(ref_count) == 16.0

    stats = fn.func.lower(params, lora, ids, mask).compile().memory_analysis()
    # the base is in the arguments, and the temporaries (activations of 2x8 tokens) stay far
    # below one copy of it; a closure over `params` moves it into the temporaries instead
    assert stats.argument_size_in_bytes >= base_bytes
    assert stats.temp_size_in_bytes < base_bytes / 4, (stats.temp_size_in_bytes, base_bytes)
