"""benchmarks/quant.py's training, perplexity and timing parts on a tiny random Llama (2 layers,
hidden 64): every configuration's base, its LoRA step and the held-out perplexity."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lora import quant
from jax_lora.lm import llama

_PATH = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", "quant.py")
_spec = importlib.util.spec_from_file_location("bench_quant", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

CFG = llama.LlamaConfig(  # contraction axes of 64 and 128: nf4 / qwix blocks of 64 fit
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=10000.0,
    max_position_embeddings=64,
)
SEQ = 16
ARGS = ["--layers", "2", "--seq", str(SEQ), "--batch", "2", "--chunk", "8"]


def _params():
    """Random fp32 params in `Llama(scan_layers=False)`'s layout (``model/layers_<i>``), the
    layout `load_quantized` gives; kernels scaled so that logits are O(1)."""
    p = llama.Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    return jax.tree.map(lambda x: x * 0.5 if x.ndim == 2 else x, p)


def _gguf_like(params):
    """The kernels as GGUF Q4_1 blocks (as `read_gguf(keep_quantized=True)` keeps them)."""

    def one(path, x):
        return quant.quantize_array(x, "q4_1") if path[-1].key == "kernel" else x

    return jax.tree_util.tree_map_with_path(one, params)


def test_round_order_is_a_fresh_permutation_each_round():
    names = list(bench.CONFIGS)
    rng = np.random.default_rng(0)
    orders = [bench.round_order(names, rng) for _ in range(20)]
    for order in orders:
        assert sorted(order) == sorted(names)  # every configuration once per round
    # not one fixed order: over 20 rounds of 7 configurations, >= 5 different ones lead
    assert len({o[0] for o in orders}) >= 5
    assert len({tuple(o) for o in orders}) == 20


def test_perplexity_is_exp_of_mean_token_nll():
    windows = np.arange(3 * 5).reshape(3, 5)

    def nll(lora, base, w):  # a window's mean NLL: its first token / 10
        assert w.shape == (1, 5)
        return jnp.float32(w[0, 0] / 10 + lora + base)

    expected = np.exp(np.mean([0.0, 0.5, 1.0]) + 0.25)
    assert bench.perplexity(nll, 0.125, 0.125, windows) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("name", ["lora_fp32", "lora_bf16", "nf4_dq", "gguf_q4_1", "qwix_nf4"])
def test_config_trains_and_held_out_perplexity_falls(name):
    a = bench.parse_args([*ARGS, "--configs", name])
    params = _params()
    if name == "gguf_q4_1":
        params = _gguf_like(params)
    # a periodic token stream: held-out windows are other phases of the same pattern
    stream = np.tile(np.random.default_rng(1).integers(0, CFG.vocab_size, 7), 40)
    train = np.stack([stream[i : i + SEQ + 1] for i in (0, 3)]).astype(np.int32)
    held_out = np.stack([stream[i : i + SEQ + 1] for i in (1, 5)]).astype(np.int32)
    # as in the benchmark: standard promotion (bf16 base against fp32 norms; optax's adam)
    with jax.numpy_dtype_promotion("standard"):
        base = bench.make_base(name, params, CFG, a)
        step, nll, lora, opt = bench.build(name, CFG, base, a)
        before = bench.perplexity(nll, lora, base, held_out)
        losses = []
        for _ in range(8):
            lora, opt, loss = step(lora, opt, base, train)
            losses.append(float(loss))
        after = bench.perplexity(nll, lora, base, held_out)
    assert np.isfinite(before) and before > 1.0
    assert losses[-1] < losses[0]
    assert after < 0.98 * before, (name, before, after)


def test_stacked_map_stacks_layers_in_numeric_order():
    """12 layers: layers_10 and layers_11 sort before layers_2 as strings; the stack must follow
    the layer index, as `llama.stack_layers` (the scanned model's layout) does."""
    layers = {f"layers_{i}": {"mlp": {"kernel": np.full((2, 3), i, np.float32)}} for i in range(12)}
    tree = {"model": {"norm": {"weight": np.ones(3, np.float32)}, **layers}}
    out = bench.stacked_map(lambda path, x: x, tree)
    expected = llama.stack_layers(tree)
    got = np.asarray(out["model"]["layers"]["mlp"]["kernel"])
    assert got.shape == (12, 2, 3)
    np.testing.assert_array_equal(got[:, 0, 0], np.arange(12, dtype=np.float32))
    np.testing.assert_array_equal(got, np.asarray(expected["model"]["layers"]["mlp"]["kernel"]))
    np.testing.assert_array_equal(out["model"]["norm"]["weight"], np.ones(3, np.float32))
