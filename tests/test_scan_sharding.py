"""Scanned layer stacks (nn.scan) and sharded training on a simulated 8-device mesh."""

import json
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close

import jax_lora
from jax_lora import LoraConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
L, D, F = 3, 16, 32


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        h = nn.gelu(nn.Dense(F, name="fc1")(nn.LayerNorm(name="ln")(x)))
        return x + nn.Dense(D, name="fc2")(h), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            length=L,
        )
        return stack(name="blocks")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(L):
            x = Block(name=f"block_{i}")(x)[0]
        return x


def _unstack(tree):
    return {f"block_{i}": jax.tree.map(lambda t, i=i: t[i], tree["blocks"]) for i in range(L)}


@pytest.fixture
def setup():
    cfg = LoraConfig(rank=4, alpha=8)
    x = jax.random.normal(jax.random.key(1), (2, 5, D))
    scanned = jax_lora.wrap(Scanned(), cfg)
    v = scanned.init(jax.random.key(0), x)
    v["lora"] = jax.tree.map(
        lambda t: 0.2 * jax.random.normal(jax.random.key(t.size), t.shape), v["lora"]
    )
    return cfg, x, scanned, v


def test_stacked_factor_shapes(setup):
    _, _, _, v = setup
    assert jax.tree.map(jnp.shape, v["lora"]) == {
        "blocks": {"fc1": {"a": (L, D, 4), "b": (L, 4, F)}, "fc2": {"a": (L, F, 4), "b": (L, 4, D)}}
    }
    # different layers got different a (split rngs), b starts at zero everywhere
    fresh = jax_lora.wrap(Scanned(), LoraConfig(rank=4)).init(
        jax.random.key(0), jnp.ones((1, 1, D))
    )["lora"]
    a = np.asarray(fresh["blocks"]["fc1"]["a"])
    assert not np.allclose(a[0], a[1]) and not np.asarray(fresh["blocks"]["fc1"]["b"]).any()


def test_scanned_equals_unrolled_outputs_grads_merge(setup):
    cfg, x, scanned, v = setup
    unrolled = jax_lora.wrap(Unrolled(), cfg)
    vu = {"params": _unstack(v["params"]), "lora": _unstack(v["lora"])}
    assert_close(scanned.apply(v, x), unrolled.apply(vu, x), 1e-6)

    def loss(model, params):
        return lambda lora: jnp.sum(model.apply({"params": params, "lora": lora}, x) ** 2)

    g_scan = jax.grad(loss(scanned, v["params"]))(v["lora"])
    g_unroll = jax.grad(loss(unrolled, vu["params"]))(vu["lora"])
    assert_close(_unstack(g_scan), g_unroll, 1e-5)
    merged, merged_u = jax_lora.merge(v, cfg), jax_lora.merge(vu, cfg)
    assert_close(_unstack(merged), merged_u, 1e-6)
    assert_close(Scanned().apply({"params": merged}, x), scanned.apply(v, x), 1e-5)


def test_factors_inherit_logical_partitioning():
    class Part(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.lecun_normal()
            h = nn.Dense(
                F, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")), name="up"
            )(x)
            q = nn.DenseGeneral(
                (2, 8), kernel_init=nn.with_partitioning(init, ("data", "model", None)), name="q"
            )(x)
            return h.sum() + q.sum()

    v = jax_lora.wrap(Part(), LoraConfig(rank=2)).init(jax.random.key(0), jnp.ones((1, D)))
    spec = nn.get_partition_spec(v)["lora"]
    P = jax.sharding.PartitionSpec
    assert spec == {
        "up": {"a": P("embed", None), "b": P(None, "mlp")},
        "q": {"a": P("data", None), "b": P(None, "model", None)},
    }
    assert type(v["lora"]["up"]["a"]).__name__ == "LogicallyPartitioned"
    assert type(v["lora"]["q"]["b"]).__name__ == "Partitioned"


def _sharded_run(*extra):
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "sharded_finetune.py"),
            "--simulate-devices",
            "8",
            "--mesh",
            "1x1,8x1,4x2,2x4",
            "--steps",
            "6",
            "--json",
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sharded_training_matches_single_device_fsdp_tp():
    # SGD: updates are linear in the gradients, so a sharding bug shows and float reassociation
    # across shards stays ~1e-6 (Adam's 1/sqrt(v) amplifies it on near-zero gradients)
    report = _sharded_run("--optimizer", "sgd")
    assert report["devices"] == 8
    single, *meshes = report["meshes"]
    assert single["mesh"] == "1x1"
    for m in meshes:
        assert m["max_loss_rel_vs_first"] < 1e-5, m
        assert m["max_update_rel_vs_first"] < 1e-4, m
        assert m["params_keep_sharding"] and m["lora_keep_sharding"], m
        assert m["fc1_kernel_spec"] == [None, "data", "model"]
        assert m["fc1_a_spec"] == [None, "data", None]
        assert m["fc1_b_spec"] == [None, None, "model"]
        # FSDP x TP: every big weight split 8 ways on all three meshes
        assert m["param_bytes_per_device"] < single["param_bytes_per_device"] / 4
    assert single["losses"][-1] < single["losses"][0]


def test_tensor_parallel_bytes_shrink_with_model_axis():
    m = {r["mesh"]: r["param_bytes_per_device"] for r in _sharded_run("--no-fsdp")["meshes"]}
    assert m["1x1"] == m["8x1"] > m["4x2"] > m["2x4"]
