"""The sweep's FLOP model (benchmarks/run.py `step_flops`) against a hand count and against the
matmuls JAX actually traces for the benchmark's floor and lora_all steps."""

import importlib
import math
import os
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_lora

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        yield importlib.import_module("run"), importlib.import_module("models")
    finally:
        sys.path.remove(BENCH)


def _dot_flops(jaxpr) -> int:
    """2 x multiply-adds of every ``dot_general`` in ``jaxpr`` and its sub-jaxprs."""
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lc, rc), (lb, _) = eqn.params["dimension_numbers"]
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            contract = math.prod(lhs[i] for i in lc)
            free_l = math.prod(s for i, s in enumerate(lhs) if i not in lc and i not in lb)
            batch = math.prod(lhs[i] for i in lb)
            free_r = math.prod(
                s
                for i, s in enumerate(rhs)
                if i not in rc and i not in eqn.params["dimension_numbers"][1][1]
            )
            total += 2 * batch * free_l * free_r * contract
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _dot_flops(sub)
    return total


def test_step_flops_hand_count(bench):
    run, models = bench
    cfg = models.GPTConfig(vocab=10, d_model=4, heads=1, d_ff=8, layers=1, seq=3)
    # per token: dense 4*4*4 + 2*4*8 + 4*10 = 168 weights -> 336 forward, x2 with the input
    # gradient; attention 2 einsums x 2*3*4 = 48 forward, x3 with its backward (dp, dv, dq, dk)
    # branch (rank 2): q,k,v,o 4 x 2*2*(4+4) + fc1, fc2 2 x 2*2*(4+8) = 224 forward, x3
    # the lora_all step skips the first layer's q, k, v input gradient: 3 x 2*4*(4+2) = 144
    got = run.step_flops(cfg, 2)
    assert got == {
        "floor": 672 + 144,
        "lora_all": 816 + 672 - 144,
        "dense": 672,
        "attention": 144,
        "branch": 672,
        "first_qkv_dx": 144,
    }
    assert run.branch_flop_ratio(cfg, 2) == pytest.approx(1344 / 816, rel=1e-12)


def test_step_flops_matches_traced_matmuls(bench):
    """The model's counts equal the dot_general FLOPs in the jaxprs of the benchmark's floor
    step (gradient of the input scale only) and its lora_all step (gradient of the factors)."""
    with jax.numpy_rank_promotion("allow"):  # the benchmark model adds (seq, d) positions
        _traced_matches(*bench)


def _traced_matches(run, models):
    cfg = models.GPTConfig(vocab=64, d_model=32, heads=2, d_ff=128, layers=2, seq=8)
    batch, rank = 2, 4
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab, (batch, cfg.seq)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, cfg.vocab, (batch, cfg.seq)), jnp.int32)
    model = models.LinenGPT(cfg)
    params = model.init(jax.random.key(0), tokens)["params"]

    def ce(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    floor = jax.make_jaxpr(jax.grad(lambda s: ce(model.apply({"params": params}, tokens, s))))(
        jnp.ones((), jnp.float32)
    )
    config = jax_lora.LoraConfig(
        rank=rank, alpha=2 * rank, targets=rf".*/({'|'.join(models.TARGETS)})"
    )
    wrapped = jax_lora.wrap(model, config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, tokens)
    step = jax.make_jaxpr(
        jax.grad(lambda lo: ce(wrapped.apply({"params": params, "lora": lo}, tokens)))
    )(lora)
    want = run.step_flops(cfg, rank)
    n = batch * cfg.seq
    assert _dot_flops(floor.jaxpr) == want["floor"] * n
    assert _dot_flops(step.jaxpr) == want["lora_all"] * n
