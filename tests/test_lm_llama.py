"""The Llama of `jax_lora.lm.llama`: ``remat=True`` changes memory, not results."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_lora
from jax_lora.lm import llama
from tests import _lm


def _loss_and_grads(remat: bool):
    params = llama.params_from_hf(_lm.tensors(0), _lm.CFG)
    wrapped = jax_lora.wrap(
        llama.Llama(_lm.CFG, remat=remat),
        jax_lora.LoraConfig(rank=4, alpha=8, targets=r".*/(q|v|down)_proj"),
    )
    ids = jnp.asarray(np.random.default_rng(1).integers(0, _lm.CFG.vocab_size, (2, 9)), jnp.int32)
    lora = jax_lora.init_lora(wrapped, jax.random.key(0), {"params": params}, ids)
    # b starts at zero (PEFT init); make it non-zero so the grads of a depend on the layer
    lora = jax.tree.map(lambda x: x + 0.05, lora)

    def loss(lora):
        logits = wrapped.apply({"params": params, "lora": lora}, ids[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()
        return nll, logits

    grad_fn = jax.jit(jax.grad(loss, has_aux=True))
    grads, logits = grad_fn(lora)
    return logits, grads, jax.make_jaxpr(grad_fn)(lora)


def test_remat_same_logits_and_lora_grads():
    logits0, grads0, jaxpr0 = _loss_and_grads(False)
    logits1, grads1, jaxpr1 = _loss_and_grads(True)
    assert logits0.shape == (2, 8, _lm.CFG.vocab_size)
    # remat really is in the step (the backward's recomputation of each layer), none without it
    assert str(jaxpr1).count("remat2[") == _lm.CFG.num_hidden_layers
    assert "remat" not in str(jaxpr0)
    assert jax.tree.structure(grads0) == jax.tree.structure(grads1)
    # same parameters; XLA may fuse the recomputed forward differently: fp32 rounding only
    np.testing.assert_allclose(logits1, logits0, rtol=1e-5, atol=1e-5)  # logits are O(1)
    for g0, g1 in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1), strict=True):
        scale = float(jnp.abs(g0).max())
        assert scale > 0
        np.testing.assert_allclose(g1, g0, rtol=1e-4, atol=1e-5 * scale)  # fp32 rounding


@pytest.mark.parametrize("remat", [False, True])
def test_remat_same_param_tree(remat):
    ids = jnp.zeros((1, 4), jnp.int32)
    shapes = jax.eval_shape(lambda: llama.Llama(_lm.CFG, remat=remat).init(jax.random.key(0), ids))
    base = jax.eval_shape(lambda: llama.Llama(_lm.CFG).init(jax.random.key(0), ids))
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(lambda s: s.shape, base)
