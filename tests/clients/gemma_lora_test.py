"""jax_lora on google-deepmind's gemma: the Gemma3 270M architecture shrunk to 2 layers.

Gemma's projections are its own ``_layers.Einsum`` (weights ``w``, ``gating_einsum``,
``linear``, two of them sharing the MLP's scope), not flax layers. The reference is gemma's
own ``gm.nn.LoRA`` with the same factor values. Gemma keeps one ``a`` for the stacked
``kv_einsum`` (k and v) and ``gating_einsum`` (gate and up) and no alpha (scale 1); jax_lora
keeps one adapter per slice, so its ``a (C, D, r)`` is gemma's ``A (D, r)`` tiled over C and
its ``b (C, r, ...)`` is gemma's ``B (r, C, ...)`` with the C axis moved first.

Run with the venv of ``.ci/gemma_venv.sh`` (gemma needs Python >= 3.12). Calls into gemma
run inside `gemma_numerics` (standard promotion); the rest stays strict.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from flax import traverse_util
from gemma import gm

import jax_lora

RANK = 4
N, K, D, H, F, VOCAB, T = 4, 2, 32, 8, 48, 64, 8  # heads, kv heads, embed, head dim, mlp, ...
LAYERS = ("layer_0", "layer_1")
TARGETS = [r".*/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w", r".*/mlp/(gating_einsum|linear)"]
# jax_lora's factors per layer, at the weight path: {weight: (a shape, b shape)}
SHAPES = {
    "attn/q_einsum/w": ((D, RANK), (RANK, N, H)),  # BTD,NDH->BTNH
    "attn/kv_einsum/w": ((2, D, RANK), (2, RANK, K, H)),  # BSD,CKDH->CBSKH, per slice
    "attn/attn_vec_einsum/w": ((N, H, RANK), (RANK, D)),  # BTNH,NHD->BTD
    "mlp/gating_einsum": ((2, D, RANK), (2, RANK, F)),  # ...F,NHF->...NH, per slice
    "mlp/linear": ((F, RANK), (RANK, D)),  # ...H,HF->...F
}
# where gemma's gm.nn.LoRA keeps the factors of the same weight (under the layer)
GEMMA = {
    "attn/q_einsum/w": "attn/q_einsum/_LoRAEinsum_0/lora",
    "attn/kv_einsum/w": "attn/kv_einsum/_LoRAEinsum_0/lora",
    "attn/attn_vec_einsum/w": "attn/attn_vec_einsum/_LoRAEinsum_0/lora",
    "mlp/gating_einsum": "mlp/_LoRAEinsum_gating_einsum/lora",
    "mlp/linear": "mlp/_LoRAEinsum_linear/lora",
}
STACKED = ("attn/kv_einsum/w", "mlp/gating_einsum")


@contextlib.contextmanager
def gemma_numerics() -> Iterator[None]:
    """gemma mixes bool/int masks and broadcasts ranks implicitly; the suite is strict."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def get(tree: Any, path: str) -> Any:
    for k in path.split("/"):
        tree = tree[k]
    return tree


def factor_paths(lora: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{"/"-joined path: {"a", "b"}}`` for every factor pair in a ``lora`` tree."""
    if set(lora) == {"a", "b"}:
        return {prefix: lora}
    out = {}
    for k, v in lora.items():
        out.update(factor_paths(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def random_like(tree: Any, seed: int) -> Any:
    """Nonzero values (``b`` too) so that every adapter moves the output."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves, strict=True)],
    )


def from_gemma(a: Any, b: Any, weight: str) -> tuple[Any, Any]:
    """gemma's shared (A, B) -> jax_lora's (a, b) for one weight."""
    if weight in STACKED:
        return jnp.broadcast_to(a, (2, *a.shape)), jnp.moveaxis(b, 1, 0)
    return a, b


@pytest.fixture(scope="module")
def gemma():
    """(model, fp32 params, tokens) for a 2-layer Gemma3 with tiny dims, random init."""
    config = dataclasses.replace(
        gm.nn.Gemma3_270M.config,
        num_embed=VOCAB,
        embed_dim=D,
        hidden_dim=F,
        num_heads=N,
        head_dim=H,
        num_kv_heads=K,
        attention_types=(
            gm.nn.config.AttentionType.LOCAL_SLIDING,
            gm.nn.config.AttentionType.GLOBAL,
        ),
        sliding_window_size=4,
    )
    model = gm.nn.Gemma3_270M(config=config, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, VOCAB, (2, T)), jnp.int32)
    with gemma_numerics():
        params = model.init(jax.random.key(0), tokens)["params"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    return model, params, tokens


def adapt(model: Any, params: Any, tokens: Any) -> tuple[Any, Any, Any]:
    config = jax_lora.LoraConfig(rank=RANK, alpha=RANK, targets=TARGETS)  # scale 1, as gemma
    wrapped = jax_lora.wrap(model, config)
    with gemma_numerics():
        lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, tokens)
    return config, wrapped, lora


def gemma_lora(model: Any, params: Any, tokens: Any) -> tuple[Any, Any]:
    """gemma's LoRA model and its params with random nonzero factors (a and b)."""
    lora_model = gm.nn.LoRA(rank=RANK, model=model, dtype=jnp.float32)
    with gemma_numerics():
        init = lora_model.init(jax.random.key(2), tokens)["params"]
    # gemma's LoRA params are the base params plus factor nodes: put the same base back
    flat, base = traverse_util.flatten_dict(init), traverse_util.flatten_dict(params)
    assert set(base) < set(flat)
    full = traverse_util.unflatten_dict({**flat, **base})
    keys = iter(jax.random.split(jax.random.key(3), 4 * len(LAYERS) * len(GEMMA)))
    for layer in LAYERS:
        for where in GEMMA.values():
            node = get(full[layer], where)
            for name in ("a", "b"):
                node[name] = 0.3 * jax.random.normal(next(keys), node[name].shape, jnp.float32)
    return lora_model, full


def logits(module: Any, variables: Any, tokens: Any) -> jax.Array:
    with gemma_numerics():
        return module.apply(variables, tokens).logits


def test_targets_by_weight_path_and_zero_b_is_base(gemma):
    model, params, tokens = gemma
    _, wrapped, lora = adapt(model, params, tokens)
    flat = factor_paths(lora)
    assert sorted(flat) == sorted(f"{layer}/{w}" for layer in LAYERS for w in SHAPES)
    for path, ab in flat.items():
        weight = path.split("/", 1)[1]
        assert (ab["a"].shape, ab["b"].shape) == SHAPES[weight], path
        assert float(jnp.abs(ab["a"]).max()) > 0 and not jnp.any(ab["b"]), path
    base = logits(model, {"params": params}, tokens)
    got = logits(wrapped, {"params": params, "lora": lora}, tokens)
    assert got.shape == (2, T, VOCAB)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))


def test_parity_with_gemma_lora(gemma):
    model, params, tokens = gemma
    _, wrapped, lora = adapt(model, params, tokens)
    lora_model, full = gemma_lora(model, params, tokens)
    for layer in LAYERS:
        for weight, where in GEMMA.items():
            node = get(full[layer], where)
            a, b = from_gemma(node["a"], node["b"], weight)
            assert (a.shape, b.shape) == SHAPES[weight]
            get(lora[layer], weight).update(a=a, b=b)
    # Base first: gemma's Transformer.__call__ is an `nn.jit`, whose trace cache must not
    # hand the base trace to the adapted call (or the LoRA trace to the disabled one).
    base = logits(model, {"params": params}, tokens)
    got = logits(wrapped, {"params": params, "lora": lora}, tokens)
    want = logits(lora_model, {"params": full}, tokens)
    assert float(jnp.abs(want - base).max()) > 1e-2  # the adapters really move the output
    assert_close(got, want, 1e-5)
    with jax_lora.disabled():
        off = logits(wrapped, {"params": params, "lora": lora}, tokens)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(base))

    # gradients: gemma's shared A gets the sum of jax_lora's per-slice a gradients
    probe = jax.random.normal(jax.random.key(4), want.shape, jnp.float32)
    g_ours = jax.grad(
        lambda lo: jnp.sum(logits(wrapped, {"params": params, "lora": lo}, tokens) * probe)
    )(lora)
    g_gemma = jax.grad(lambda p: jnp.sum(logits(lora_model, {"params": p}, tokens) * probe))(full)
    for layer in LAYERS:
        for weight, where in GEMMA.items():
            ours, theirs = get(g_ours[layer], weight), get(g_gemma[layer], where)
            if weight in STACKED:
                ours = {"a": ours["a"].sum(0), "b": jnp.moveaxis(ours["b"], 0, 1)}
            assert_close(ours["a"], theirs["a"], 1e-5)
            assert_close(ours["b"], theirs["b"], 1e-5)


def test_merge_keeps_layout_and_matches_unmerged(gemma):
    model, params, tokens = gemma
    config, wrapped, lora = adapt(model, params, tokens)
    lora = random_like(lora, 5)
    variables = {"params": params, "lora": lora}
    with gemma_numerics():
        merged = jax_lora.merge(variables, wrapped, tokens)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, params)
    for layer in LAYERS:
        # stacked and transposed: gating w (2, H, F) stores slice n as (a[n] @ b[n]).T
        w, ab = get(params[layer], "mlp/gating_einsum"), get(lora[layer], "mlp/gating_einsum")
        want = w + config.scale * jnp.einsum("nfr,nrh->nhf", ab["a"], ab["b"])
        assert_close(get(merged[layer], "mlp/gating_einsum"), want, 1e-6)
        # kv w (C, K, D, H), a (C, D, r), b (C, r, K, H)
        w, ab = get(params[layer], "attn/kv_einsum/w"), get(lora[layer], "attn/kv_einsum/w")
        want = w + config.scale * jnp.einsum("cdr,crkh->ckdh", ab["a"], ab["b"])
        assert_close(get(merged[layer], "attn/kv_einsum/w"), want, 1e-6)
    assert_close(
        logits(model, {"params": merged}, tokens), logits(wrapped, variables, tokens), 1e-5
    )


def test_adam_trains_only_factors(gemma):
    model, params, tokens = gemma
    _, wrapped, lora = adapt(model, params, tokens)
    lora = random_like(lora, 6)
    variables = {"params": params, "lora": lora}
    labels = jnp.roll(tokens, -1, axis=1)

    @jax.jit
    def loss_and_grad(variables):
        def loss(v):
            out = logits(wrapped, v, tokens)
            return optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()

        return jax.value_and_grad(loss)(variables)

    tx = jax_lora.optimizer(optax.adam(1e-2))
    state = tx.init(variables)
    first = None
    for _ in range(5):
        loss, grads = loss_and_grad(variables)
        first = float(loss) if first is None else first
        with jax.numpy_dtype_promotion("standard"):  # optax's adam bias correction
            updates, state = tx.update(grads, state, variables)
        assert not any(jnp.any(u) for u in jax.tree.leaves(updates["params"]))
        assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates["lora"]))
        variables = optax.apply_updates(variables, updates)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params)
    final, _ = loss_and_grad(variables)
    assert float(final) < first - 1e-3, (first, float(final))
