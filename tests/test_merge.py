import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close, max_rel_err
from _models import MLP, Encoder

import jax_lora
from jax_lora import LoraConfig

KEY = jax.random.key(0)


def _setup(model, x, cfg, seed=3):
    wrapped = jax_lora.wrap(model, cfg)
    v = wrapped.init(KEY, x)
    leaves, treedef = jax.tree.flatten(v["lora"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    v["lora"] = jax.tree.unflatten(
        treedef,
        [0.2 * jax.random.normal(k, t.shape, t.dtype) for k, t in zip(keys, leaves, strict=True)],
    )
    return wrapped, v


@pytest.mark.parametrize("model, shape", [(MLP(), (4, 16)), (Encoder(), (2, 5, 16))])
def test_merged_equals_wrapped(model, shape):
    x = jax.random.normal(jax.random.key(1), shape)
    cfg = LoraConfig(rank=4, alpha=12)
    wrapped, v = _setup(model, x, cfg)
    merged = jax_lora.merge(v, cfg)
    assert jax.tree.structure(merged) == jax.tree.structure(v["params"])
    y_merged = model.apply({"params": merged}, x)
    y_wrapped = wrapped.apply(v, x)
    assert max_rel_err(y_merged, model.apply({"params": v["params"]}, x)) > 1e-2
    assert_close(y_merged, y_wrapped, 1e-5)


def test_merge_kernel_formula_and_inputs_untouched():
    x = jnp.ones((1, 16))
    cfg = LoraConfig(rank=2, alpha=3)
    _, v = _setup(MLP(), x, cfg)
    before = jax.tree.map(np.array, v)
    merged = jax_lora.merge(v, cfg)
    a, b = np.asarray(v["lora"]["fc2"]["a"]), np.asarray(v["lora"]["fc2"]["b"])
    want = np.asarray(v["params"]["fc2"]["kernel"]) + 1.5 * a @ b
    np.testing.assert_allclose(merged["fc2"]["kernel"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged["fc2"]["bias"], v["params"]["fc2"]["bias"])
    jax.tree.map(np.testing.assert_array_equal, v, before)


def test_unmerge_inverts_merge():
    x = jax.random.normal(jax.random.key(1), (2, 5, 16))
    cfg = LoraConfig(rank=4)
    _, v = _setup(Encoder(), x, cfg)
    back = jax_lora.unmerge({"params": jax_lora.merge(v, cfg), "lora": v["lora"]}, cfg)
    # fp32 add-then-subtract: error is a few ulps of the merged kernel
    assert_close(back, v["params"], 1e-6)


def test_merge_stacked_factors():
    """Leading (layer) axes shared by a, b and the kernel, as in scanned stacks."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 8, 2, 4)).astype(np.float32)
    a = rng.normal(size=(3, 8, 2)).astype(np.float32)
    b = rng.normal(size=(3, 2, 2, 4)).astype(np.float32)
    merged = jax_lora.merge(
        {"params": {"k": {"kernel": w}}, "lora": {"k": {"a": a, "b": b}}}, LoraConfig(rank=2)
    )
    want = w + np.einsum("lir,lrno->lino", a, b)
    np.testing.assert_allclose(merged["k"]["kernel"], want, rtol=1e-5, atol=1e-5)


def test_merge_keeps_bf16_kernel_dtype():
    x = jnp.ones((1, 16), jnp.bfloat16)
    cfg = LoraConfig(rank=2)
    _, v = _setup(MLP(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16), x, cfg)
    merged = jax_lora.merge(v, cfg)
    k = merged["fc1"]["kernel"]
    assert k.dtype == jnp.bfloat16
    want = np.asarray(v["params"]["fc1"]["kernel"], np.float32) + np.asarray(
        v["lora"]["fc1"]["a"]
    ) @ np.asarray(v["lora"]["fc1"]["b"])
    np.testing.assert_allclose(np.asarray(k, np.float32), want, rtol=1e-2, atol=1e-2)


def test_merge_errors_name_path_and_shapes():
    x = jnp.ones((1, 16))
    cfg = LoraConfig(rank=2)
    _, v = _setup(MLP(), x, cfg)
    bad = {
        "params": v["params"],
        "lora": dict(v["lora"], fc2={"a": jnp.zeros((15, 2)), "b": jnp.zeros((2, 16))}),
    }
    with pytest.raises(
        ValueError,
        match=r"at 'fc2' do not fit the kernel: a \(15, 2\) @ b \(2, 16\) vs kernel \(16, 16\)",
    ):
        jax_lora.merge(bad, cfg)
    stray = {
        "params": v["params"],
        "lora": dict(v["lora"], extra={"a": jnp.zeros((16, 2)), "b": jnp.zeros((2, 16))}),
    }
    with pytest.raises(ValueError, match="factors at 'extra' but `params` has no layer there"):
        jax_lora.merge(stray, cfg)
    with pytest.raises(ValueError, match="no 'lora' entry"):
        jax_lora.merge({"params": v["params"]}, cfg)
