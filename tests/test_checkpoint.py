"""Adapter checkpoints: round trip, retention, size, exact resume, and faults."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _models import MLP, Encoder

import jax_lora
from jax_lora import LoraConfig

HERE = pathlib.Path(__file__).resolve().parent


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax and orbax internals
        yield


def _lora(model=None, x=None, cfg=None, seed=3):
    cfg = cfg or LoraConfig(rank=4)
    model = model or Encoder()
    x = x if x is not None else jnp.ones((1, 5, 16))
    v = jax_lora.wrap(model, cfg).init(jax.random.key(0), x)
    leaves, treedef = jax.tree.flatten(v["lora"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, t.shape) for k, t in zip(keys, leaves, strict=True)]
    )


def _equal(a, b):
    jax.tree.map(lambda p, q: np.testing.assert_array_equal(np.asarray(p), np.asarray(q)), a, b)


def test_round_trip_with_config_and_opt_state(tmp_path):
    lora = _lora()
    cfg = LoraConfig(
        rank=4, alpha=12, targets=[r".*/query", r".*/up"], exclude="x", dropout=0.1, rslora=True
    )
    tx = optax.adam(1e-3)
    state = tx.init(lora)
    _, state = tx.update(lora, state, lora)  # non-trivial moments and count
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        assert ck.save(7, lora, cfg, opt_state=state)
        ck.wait()
        r = ck.restore(lora, opt_state_like=tx.init(lora))
    assert r.step == 7 and r.config == cfg
    _equal(r.lora, lora)
    assert jax.tree.structure(r.opt_state) == jax.tree.structure(state)
    _equal(r.opt_state, state)
    assert type(r.opt_state[0]).__name__ == "ScaleByAdamState"


def test_keeps_last_n_and_never_overwrites(tmp_path):
    lora = _lora()
    with jax_lora.AdapterCheckpointer(tmp_path, max_to_keep=2) as ck:
        for s in (1, 2, 3):
            ck.save(s, jax.tree.map(lambda t, s=s: t + s, lora), LoraConfig(rank=4))
        ck.wait()
        assert ck.all_steps() == [2, 3]
        with pytest.raises(ValueError, match="step 3 already exists"):
            ck.save(3, lora, LoraConfig(rank=4))
        _equal(ck.restore(lora).lora, jax.tree.map(lambda t: t + 3, lora))
        _equal(ck.restore(lora, step=2).lora, jax.tree.map(lambda t: t + 2, lora))


def test_on_disk_size_is_the_factor_bytes(tmp_path):
    model = MLP(hidden=512, out=512)
    lora = _lora(model, jnp.ones((1, 512)), LoraConfig(rank=16))
    n_bytes = 4 * sum(t.size for t in jax.tree.leaves(lora))  # fp32, ~ 200 KB
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=16))
    size = sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file())
    # orbax zstd-compresses random fp32 by ~5% (the exponent bytes); metadata adds < 16 KiB
    assert 0.85 * n_bytes <= size <= n_bytes + 16 * 1024, (size, n_bytes)


def test_refuses_the_whole_variables_tree(tmp_path):
    with (
        jax_lora.AdapterCheckpointer(tmp_path) as ck,
        pytest.raises(ValueError, match="not the whole variables"),
    ):
        ck.save(1, {"params": {}, "lora": _lora()}, LoraConfig(rank=4))


def test_mismatched_model_names_path_and_shapes(tmp_path):
    lora = _lora()
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=4))
        ck.wait()
        other_rank = _lora(cfg=LoraConfig(rank=2))
        with pytest.raises(
            ValueError, match=r"'head/a' with shape \(16, 4\), the model needs \(16, 2\)"
        ):
            ck.restore(other_rank)
        fewer = _lora(cfg=LoraConfig(rank=4, targets=".*/query"))
        with pytest.raises(
            ValueError, match=r"has factor 'head/a' \(16, 4\) that the model does not"
        ):
            ck.restore(fewer)


def _worker(*args):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(HERE / "_ckpt_worker.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_exact_resume_in_a_fresh_process(tmp_path):
    n, k = 12, 5
    for args in (
        ("straight", tmp_path / "unused", n, tmp_path / "straight.npz"),
        ("train_and_save", tmp_path / "ck", k),
        ("restore_and_finish", tmp_path / "ck", n, tmp_path / "resumed.npz"),
    ):
        out = _worker(*args)
        assert out.returncode == 0, out.stderr[-3000:]
    straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(straight.files) == sorted(resumed.files) and len(straight.files) == 6
    for key in straight.files:  # bitwise, on CPU
        np.testing.assert_array_equal(resumed[key], straight[key])


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    out = _worker("die_during_save", tmp_path)
    assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert any(name.startswith("2") for name in leftovers), leftovers  # the half-written step 2
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        assert ck.all_steps() == [1]
        model = jax_lora.wrap(MLP(), LoraConfig(rank=4, alpha=8))
        like = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16)))["lora"]
        r = ck.restore(like)
    assert r.step == 1 and r.config == LoraConfig(rank=4, alpha=8)


def test_corrupt_checkpoint_raises_clearly_and_changes_nothing(tmp_path):
    lora = _lora()
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=4))
    before = jax.tree.map(np.array, lora)
    data = [p for p in (tmp_path / "1" / "lora").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:  # chop the array data in half
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with (
        jax_lora.AdapterCheckpointer(tmp_path) as ck,
        pytest.raises(ValueError, match="step 1 .* is corrupt or incomplete"),
    ):
        ck.restore(lora)
    _equal(lora, before)
    (tmp_path / "1" / "lora" / "_METADATA").unlink()
    with (
        jax_lora.AdapterCheckpointer(tmp_path) as ck,
        pytest.raises(ValueError, match="corrupt or incomplete"),
    ):
        ck.restore(lora)
