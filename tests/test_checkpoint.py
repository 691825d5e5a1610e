"""Adapter checkpoints: round trip, retention, size, exact resume, and faults."""

import errno
import os
import pathlib
import shutil
import subprocess
import sys
import time

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
    every = [r".*/attn/.*", r".*/(up|down)", "head"]  # targets=None would leave out the head
    lora = _lora(cfg=LoraConfig(rank=4, targets=every))
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=4, targets=every))
        ck.wait()
        other_rank = _lora(cfg=LoraConfig(rank=2, targets=every))
        with pytest.raises(
            ValueError, match=r"'head/a' with shape \(16, 4\), the model needs \(16, 2\)"
        ):
            ck.restore(other_rank)
        fewer = _lora(cfg=LoraConfig(rank=4, targets=".*/query"))
        with pytest.raises(
            ValueError, match=r"has factor 'head/a' \(16, 4\) that the model does not"
        ):
            ck.restore(fewer)


def _worker(*args, timeout=300):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, str(HERE / "_ckpt_worker.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
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
    # a, b of fc1 and fc2 (targets=None leaves out the output head)
    assert sorted(straight.files) == sorted(resumed.files) and len(straight.files) == 4
    for key in straight.files:  # bitwise, on CPU
        np.testing.assert_array_equal(resumed[key], straight[key])


def test_interrupted_save_leaves_previous_checkpoint(tmp_path):
    out = _worker("die_during_save", tmp_path)
    assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
    leftovers = [p.name for p in tmp_path.iterdir() if not p.name.isdigit()]
    assert any("2" in name for name in leftovers), leftovers  # the half-written step 2
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        assert ck.all_steps() == [1]
        model = jax_lora.wrap(MLP(), LoraConfig(rank=4, alpha=8))
        like = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 16)))["lora"]
        r = ck.restore(like)
        assert r.step == 1 and r.config == LoraConfig(rank=4, alpha=8)
        ck.save(2, r.lora, r.config)  # the next writer clears the half-written folder
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".lock") == [
        "1",
        "2",
    ]


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


def _entries(path):
    """The folder's entries other than step folders and the writer's lock file."""
    return sorted(p.name for p in path.iterdir() if not p.name.isdigit() and p.name != ".lock")


def _np_lora():
    return {
        "enc": {
            "fc": {"a": np.arange(24, dtype=np.float32).reshape(6, 4) / 7, "b": -np.ones((4, 3))},
        },
        "head": {"a": np.linspace(-1, 1, 8, dtype=np.float32).reshape(4, 2), "b": np.eye(2)},
    }


def _f32(tree):
    return jax.tree.map(lambda t: np.asarray(t, np.float32), tree)


# 7a: like's dtype and sharding


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("abstract", [False, True])
def test_restore_takes_like_dtype_and_sharding(tmp_path, dtype, abstract):
    lora = _f32(_np_lora())
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    named = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "x"))
    like = jax.tree.map(lambda t: jax.device_put(jnp.asarray(t, dtype), named), lora)
    if abstract:
        like = jax.tree.map(lambda t: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=named), like)
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=4))
        ck.wait()
        r = ck.restore(like)
    for got, want in zip(jax.tree.leaves(r.lora), jax.tree.leaves(lora), strict=True):
        assert isinstance(got, jax.Array) and got.dtype == dtype, got.dtype
        assert got.sharding == named, got.sharding
        np.testing.assert_array_equal(np.asarray(got), want.astype(dtype))  # one rounding


def test_restore_opt_state_takes_like_dtype(tmp_path):
    lora = _f32(_np_lora())
    tx = optax.adam(1e-3)
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=4), opt_state=tx.init(lora))
        ck.wait()
        like16 = jax.tree.map(lambda t: jnp.asarray(t, jnp.bfloat16), lora)
        r = ck.restore(like16, opt_state_like=tx.init(like16))
    mu = r.opt_state[0].mu
    assert {t.dtype for t in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    assert r.opt_state[0].count.dtype == jnp.int32


# 9: two writers on one folder


def test_second_writer_never_overwrites_or_prunes(tmp_path):
    lora = _f32(_np_lora())
    first = jax_lora.AdapterCheckpointer(tmp_path, max_to_keep=1)
    second = jax_lora.AdapterCheckpointer(tmp_path, max_to_keep=5)
    first.save(1, lora, LoraConfig(rank=4))
    first.wait()
    other = jax.tree.map(lambda t: t + 1, lora)
    for step in (1, 2):
        with pytest.raises(RuntimeError, match=f"{tmp_path}.* another AdapterCheckpointer"):
            second.save(step, other, LoraConfig(rank=4))
    assert second.all_steps() == [1]
    _equal(second.restore(lora).lora, lora)  # reading while another writes is fine
    first.close()
    second.save(2, other, LoraConfig(rank=4))  # the first has let go
    second.close()
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        assert ck.all_steps() == [1, 2]
        _equal(ck.restore(lora, step=1).lora, lora)
        _equal(ck.restore(lora, step=2).lora, other)


# 10: a file where the folder should be


def test_directory_that_is_a_file_is_refused_up_front(tmp_path):
    path = tmp_path / "ck"
    path.write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=rf"{path}.* is a file, not a folder"):
        jax_lora.AdapterCheckpointer(path)
    assert path.read_text() == "not a folder"


def test_directory_that_is_a_file_does_not_hold_up_exit(tmp_path):
    path = tmp_path / "ck"
    path.write_text("not a folder")
    out = _worker("dir_is_file", path, timeout=60)  # orbax's threads used to wait 300 s
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"raised NotADirectoryError: checkpoint folder {path}" in out.stdout, out.stdout


# 17: a failed write (disk full)


def _disk_full(monkeypatch):
    import orbax.checkpoint as ocp

    orig = ocp.StandardCheckpointHandler.async_save

    async def full(self, directory, *args, **kwargs):  # some bytes written, then ENOSPC
        for f in await orig(self, directory, *args, **kwargs) or []:
            f.result()
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", full)


@pytest.mark.parametrize("async_save", [False, True])
def test_failed_save_cleans_up_and_raises(tmp_path, monkeypatch, async_save):
    lora = _f32(_np_lora())
    with jax_lora.AdapterCheckpointer(tmp_path, async_save=async_save) as ck:
        ck.save(1, lora, LoraConfig(rank=4))
        ck.wait()
        with monkeypatch.context() as m:
            _disk_full(m)
            with pytest.raises(OSError, match="No space left") as info:
                ck.save(2, lora, LoraConfig(rank=4))
                ck.wait()
            assert "step 2" in str(info.value) + "".join(getattr(info.value, "__notes__", []))
        assert _entries(tmp_path) == [] and ck.all_steps() == [1]
        ck.save(3, lora, LoraConfig(rank=4))  # the checkpointer still works
        ck.wait()
        assert ck.all_steps() == [1, 3]


def test_failed_async_save_surfaces_at_close(tmp_path, monkeypatch):
    lora = _f32(_np_lora())
    ck = jax_lora.AdapterCheckpointer(tmp_path)
    _disk_full(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        ck.save(1, lora, LoraConfig(rank=4))
        ck.close()
    assert _entries(tmp_path) == [] and ck.all_steps() == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_real_write_failure_in_a_fresh_process(tmp_path, mode):
    # RLIMIT_FSIZE makes the writes of tensorstore itself fail (EFBIG), like a full disk
    out = _worker("disk_full", tmp_path, mode, "exit_without_close", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"raised OSError errno={errno.EFBIG}" in out.stdout, out.stdout
    assert "entries ['.lock', '1']" in out.stdout, out.stdout  # no temporary folder left


# 12: a changed config.json or factor file never loads silently


def _saved(tmp_path, lora=None):
    lora = _f32(_np_lora()) if lora is None else lora
    cfg = LoraConfig(rank=2, alpha=4.0, dropout=0.0, targets=[".*/fc"])
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(1, lora, cfg, opt_state=optax.sgd(0.1, momentum=0.9).init(lora))
    return tmp_path / "ck", lora, cfg


def test_every_flipped_config_byte_is_caught(tmp_path):
    ck_dir, lora, cfg = _saved(tmp_path)
    path = ck_dir / "1" / "config.json"
    good = path.read_bytes()
    assert len(good) > 150
    outcomes = {"same": 0, "error": 0}
    with jax_lora.AdapterCheckpointer(ck_dir) as ck:
        for bit in (0x01, 0x04):  # 0x04 turned rank 2 into 6 and alpha 4.0 into 4.4
            for i in range(len(good)):
                path.write_bytes(good[:i] + bytes([good[i] ^ bit]) + good[i + 1 :])
                try:
                    r = ck.restore(lora)
                except ValueError as e:
                    assert str(path) in str(e), (i, bit, e)
                    outcomes["error"] += 1
                else:
                    assert r.config == cfg, (i, bit, r.config)
                    _equal(r.lora, lora)
                    outcomes["same"] += 1
    assert outcomes["error"] >= 2 * len(good) - 2, outcomes
    path.write_bytes(good)
    with jax_lora.AdapterCheckpointer(ck_dir) as ck:
        assert ck.restore(lora).config == cfg


def test_flipped_factor_bytes_are_caught(tmp_path):
    rng = np.random.default_rng(0)  # arrays big enough to live in data files, not inline
    lora = {"fc": {"a": rng.normal(size=(64, 16)), "b": rng.normal(size=(16, 32))}}
    ck_dir, lora, _ = _saved(tmp_path, _f32(lora))
    tx = optax.sgd(0.1, momentum=0.9)
    files = sorted(
        p.relative_to(ck_dir / "1")
        for p in (ck_dir / "1").rglob("*")
        if p.is_file() and p.name != "config.json"
    )
    assert len(files) >= 6, files  # the lora and opt_state items: data, manifests, metadata
    caught = {}
    for k, rel in enumerate(files):
        data = (ck_dir / "1" / rel).read_bytes()
        for j, i in enumerate(np.linspace(0, len(data) - 1, 12).astype(int)):
            case = tmp_path / f"case_{k}_{j}"
            shutil.copytree(ck_dir, case)  # a fresh path: nothing cached
            (case / "1" / rel).write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])
            with jax_lora.AdapterCheckpointer(case) as ck:
                try:
                    r = ck.restore(lora, opt_state_like=tx.init(lora))
                except ValueError as e:
                    assert f"{case / '1'}" in str(e), (rel, i, e)
                    caught[rel] = caught.get(rel, 0) + 1
                else:  # only a byte that does not matter (e.g. padding) may pass
                    _equal(r.lora, lora)
                    _equal(r.opt_state, tx.init(lora))
            shutil.rmtree(case)
    # every flip in the manifests, and all but slack bytes of the array data (the largest file;
    # the optimizer's zero moments compress to nothing and sit inline)
    assert caught.get(pathlib.Path("lora", "manifest.ocdbt")) == 12, caught
    assert caught.get(pathlib.Path("opt_state", "manifest.ocdbt")) == 12, caught
    data_file = max(
        (r for r in files if r.parts[0] == "lora"), key=lambda r: (ck_dir / "1" / r).stat().st_size
    )
    assert (ck_dir / "1" / data_file).stat().st_size > 2048, data_file
    assert caught.get(data_file, 0) >= 10, (data_file, caught)


def test_config_from_json_checks_every_field():
    good = jax_lora.checkpoint.config_to_json(LoraConfig(rank=2, alpha=4, targets=["x"]))
    assert jax_lora.checkpoint.config_from_json(dict(good)) == LoraConfig(2, 4, targets=["x"])
    bad = {
        "rank": "2",
        "alpha": [4],
        "targets": "x",
        "exclude": [1],
        "dropout": True,
        "init": 3,
        "rslora": 1,
        "param_dtype": "int32",
        "format": "jax_lora.adapter/0",
    }
    for field, value in bad.items():
        with pytest.raises(ValueError, match=f"`{field}`"):
            jax_lora.checkpoint.config_from_json({**good, field: value})
    for field in good:
        missing = {k: v for k, v in good.items() if k != field}
        with pytest.raises(ValueError, match=f"`{field}`"):
            jax_lora.checkpoint.config_from_json(missing)
    with pytest.raises(ValueError, match="`rnak`"):
        jax_lora.checkpoint.config_from_json({**good, "rnak": 2})
    with pytest.raises(ValueError, match="a JSON object"):
        jax_lora.checkpoint.config_from_json([good])


# 14: steps and retention


def test_steps_are_non_negative_integers(tmp_path):
    lora = _f32(_np_lora())
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        for bad, err in ((-1, ValueError), (True, TypeError), (1.5, TypeError), ("3", TypeError)):
            with pytest.raises(err, match=f"step.*{bad!r}"):
                ck.save(bad, lora, LoraConfig(rank=4))
        ck.save(np.int64(4), lora, LoraConfig(rank=4))
        ck.save(0, lora, LoraConfig(rank=4))
        with pytest.raises(TypeError, match="step.*'4'"):
            ck.restore(lora, step="4")
    assert _entries(tmp_path) == []
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:  # reopened: both restorable
        assert ck.all_steps() == [0, 4] and ck.latest_step() == 4
        assert ck.restore(lora, step=np.int32(4)).step == 4 and ck.restore(lora, step=0).step == 0
        assert all(type(s) is int for s in ck.all_steps())


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_max_to_keep_is_at_least_one_or_none(tmp_path, bad):
    with pytest.raises((TypeError, ValueError), match=f"max_to_keep.*{bad!r}"):
        jax_lora.AdapterCheckpointer(tmp_path, max_to_keep=bad)


def test_max_to_keep_none_keeps_everything(tmp_path):
    lora = _f32(_np_lora())
    with jax_lora.AdapterCheckpointer(tmp_path, max_to_keep=None) as ck:
        for s in range(5):
            ck.save(s, lora, LoraConfig(rank=4))
        ck.wait()
        assert ck.all_steps() == [0, 1, 2, 3, 4]


# 16: boxed (nn.with_partitioning) and plain trees


def _boxed_model():
    import flax.linen as nn

    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, kernel_init=init, name="fc")(x)

    return jax_lora.wrap(Boxed(), LoraConfig(rank=2))


def test_boxed_and_plain_trees_are_the_same_checkpoint(tmp_path):
    from flax.core import meta

    boxed = _boxed_model().init(jax.random.key(0), jnp.ones((1, 4)))["lora"]
    assert isinstance(boxed["fc"]["a"], meta.AxisMetadata)  # init gives boxed factors
    boxed = jax.tree.map(lambda t: t + 0.5, boxed)  # boxes survive tree.map
    plain = meta.unbox(boxed)
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, boxed, LoraConfig(rank=2))
        ck.save(2, plain, LoraConfig(rank=2))
        ck.wait()
        for step in (1, 2):
            got = ck.restore(plain, step=step).lora  # the README's recipe: unboxed like
            assert not any(isinstance(t, meta.AxisMetadata) for t in jax.tree.leaves(got))
            _equal(got, plain)
            got = ck.restore(boxed, step=step).lora  # boxed like: boxed back, same names
            leaves = jax.tree.leaves(got, is_leaf=lambda t: isinstance(t, meta.AxisMetadata))
            assert [type(t) for t in leaves] == [
                type(t)
                for t in jax.tree.leaves(boxed, is_leaf=lambda t: isinstance(t, meta.AxisMetadata))
            ]
            assert got["fc"]["a"].names == boxed["fc"]["a"].names
            _equal(meta.unbox(got), plain)


# 22: a kill while pruning


def _check_all_listed_restore(path):
    with jax_lora.AdapterCheckpointer(path) as ck:
        steps = ck.all_steps()
        for s in steps:
            got = ck.restore(step=s).lora
            for i in range(3):
                np.testing.assert_array_equal(
                    np.asarray(got[f"layer_{i}"]["a"]), np.full((256, 8), s + i / 1000, np.float32)
                )
    return steps


@pytest.mark.parametrize("nth", [1, 5])
def test_kill_inside_pruning_leaves_only_restorable_steps(tmp_path, nth):
    out = _worker("die_during_prune", tmp_path, nth)
    assert out.returncode == -9, (out.returncode, out.stderr[-2000:])
    steps = _check_all_listed_restore(tmp_path)
    assert 3 in steps and 2 in steps, steps  # killed after step 3 was committed


def test_random_kills_leave_only_restorable_steps(tmp_path):
    rng = np.random.default_rng(0)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    )
    for k in range(10):
        path = tmp_path / str(k)
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "_ckpt_worker.py"), "save_forever", str(path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.6))  # a random point in the save/prune cycle
        proc.kill()
        proc.wait()
        steps = _check_all_listed_restore(path)
        assert steps, k


# programming errors are not relabelled "corrupt"


def test_a_bug_is_not_reported_as_a_corrupt_checkpoint(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    lora = _f32(_np_lora())
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, LoraConfig(rank=4))
        ck.wait()

        def buggy(self, *args, **kwargs):
            raise TypeError("a bug, not a corrupt file")

        monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", buggy)
        with pytest.raises(TypeError, match="a bug"):
            ck.restore(lora)
