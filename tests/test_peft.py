"""PEFT-format export/import without torch: files, layouts, round trips and refusals."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import Encoder
from safetensors.numpy import load_file, save_file

import jax_lora
from jax_lora import LoraConfig

EVERY = [r".*/attn/.*", r".*/(up|down)", "head"]  # targets=None would leave out the head


def _lora(cfg=None):
    cfg = cfg or LoraConfig(rank=4, alpha=8, targets=EVERY)
    # shapes only (no compile: fast on a busy CI machine), then random factors
    v = jax.eval_shape(jax_lora.wrap(Encoder(), cfg).init, jax.random.key(0), jnp.ones((1, 5, 16)))
    rng = np.random.default_rng(1)
    return jax.tree.map(lambda t: rng.standard_normal(t.shape).astype(np.float32), v["lora"])


def test_export_files_keys_and_layouts(tmp_path):
    lora = _lora()
    cfg = LoraConfig(rank=4, alpha=8, dropout=0.05, rslora=True)
    names = jax_lora.export_peft(tmp_path / "ad", lora, cfg, base_model_name_or_path="toy")
    raw = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 4 and raw["lora_alpha"] == 8.0
    assert raw["lora_dropout"] == 0.05 and raw["use_rslora"] is True and raw["bias"] == "none"
    assert raw["fan_in_fan_out"] is False and raw["target_modules"] == names
    assert "layer_0.attn.query" in names and "head" in names and len(names) == 13
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert len(t) == 2 * len(names)
    q = lora["layer_0"]["attn"]["query"]  # a (16, 4), b (4, 2, 8)
    np.testing.assert_array_equal(
        t["base_model.model.layer_0.attn.query.lora_A.weight"], np.asarray(q["a"]).T
    )
    np.testing.assert_array_equal(
        t["base_model.model.layer_0.attn.query.lora_B.weight"], np.asarray(q["b"]).reshape(4, 16).T
    )
    o = lora["layer_0"]["attn"]["out"]  # a (2, 8, 4), b (4, 16)
    assert t["base_model.model.layer_0.attn.out.lora_A.weight"].shape == (4, 16)
    # the delta W PEFT sees is ours, flattened: (B A)^T == a @ b reshaped
    dw_peft = (
        t["base_model.model.layer_0.attn.out.lora_B.weight"]
        @ t["base_model.model.layer_0.attn.out.lora_A.weight"]
    )
    np.testing.assert_allclose(
        dw_peft.T, np.tensordot(o["a"], o["b"], 1).reshape(16, 16), rtol=1e-5, atol=1e-5
    )


def test_round_trip_exact_with_like(tmp_path):
    lora = _lora()
    cfg = LoraConfig(rank=4, alpha=8, rslora=True)
    jax_lora.export_peft(tmp_path, lora, cfg)
    back, cfg2 = jax_lora.import_peft(tmp_path, like=lora)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, lora))
    assert (cfg2.rank, cfg2.alpha, cfg2.rslora, cfg2.scale) == (4, 8.0, True, cfg.scale)
    # cfg2.targets name exactly the imported layers: wrapping with it reproduces the tree
    v = jax.eval_shape(jax_lora.wrap(Encoder(), cfg2).init, jax.random.key(0), jnp.ones((1, 5, 16)))
    assert jax.tree.structure(v["lora"]) == jax.tree.structure(lora)


def test_name_tables_and_functions(tmp_path):
    lora = {"enc": {"q": {"a": np.ones((3, 2), np.float32), "b": np.ones((2, 5), np.float32)}}}
    jax_lora.export_peft(
        tmp_path, lora, LoraConfig(rank=2), torch_name={"enc/q": "model.layers.0.q_proj"}
    )
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.model.model.layers.0.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.q_proj.lora_B.weight",
    }
    back, _ = jax_lora.import_peft(tmp_path, flax_path=lambda n: "enc/q")
    assert back["enc"]["q"]["a"].shape == (3, 2) and back["enc"]["q"]["b"].shape == (2, 5)
    with pytest.raises(KeyError, match="no entry for 'enc/q'"):
        jax_lora.export_peft(tmp_path / "x", lora, LoraConfig(rank=2), torch_name={})


def test_failed_export_keeps_existing_adapter(tmp_path):
    lora = _lora()
    jax_lora.export_peft(tmp_path / "ad", lora, LoraConfig(rank=4))
    before = (tmp_path / "ad" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="config.rank` is 2"):
        jax_lora.export_peft(tmp_path / "ad", lora, LoraConfig(rank=2))
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]  # no temp dirs left behind


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_dora", True),
        ("bias", "all"),
        ("lora_bias", True),
        ("modules_to_save", ["classifier"]),
    ],
)
def test_unsupported_config_fields_named(tmp_path, field, value):
    jax_lora.export_peft(tmp_path, _lora(), LoraConfig(rank=4))
    p = tmp_path / "adapter_config.json"
    raw = json.loads(p.read_text())
    raw[field] = value
    p.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=f"`{field}`"):
        jax_lora.import_peft(tmp_path)


def test_foreign_tensor_and_layout_mismatch(tmp_path):
    lora = _lora()
    jax_lora.export_peft(tmp_path, lora, LoraConfig(rank=4))
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    save_file({**t, "base_model.model.emb.lora_E": np.zeros((4,), np.float32)}, f)
    with pytest.raises(
        ValueError, match="'base_model.model.emb.lora_E' is not a LoRA Linear factor"
    ):
        jax_lora.import_peft(tmp_path)
    save_file(t, f)
    small = _lora(LoraConfig(rank=4, targets=r".*/query"))
    with pytest.raises(ValueError, match="has factor 'head/a' .* that the model does not"):
        jax_lora.import_peft(tmp_path, like=small)
    other = _lora(LoraConfig(rank=2, targets=EVERY))
    with pytest.raises(
        ValueError, match=r"'head/a' with shape \(16, 4\), the model needs \(16, 2\)"
    ):
        jax_lora.import_peft(tmp_path, like=other)


# --- issue #12 hardening ------------------------------------------------------------------


def _small(rank=2, fan_in=3, fan_out=5, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": rng.standard_normal((fan_in, rank)).astype(np.float32),
        "b": rng.standard_normal((rank, fan_out)).astype(np.float32),
    }


def _edit_config(directory, **fields):
    p = directory / "adapter_config.json"
    raw = json.loads(p.read_text())
    for k, v in fields.items():
        if v is _DROP:
            raw.pop(k)
        else:
            raw[k] = v
    p.write_text(json.dumps(raw))


_DROP = object()


class _Partitioned(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = nn.Dense(8, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
        return nn.Dense(4, kernel_init=nn.with_partitioning(init, (None, "model")), name="out")(x)


def test_export_and_import_unbox_partitioned_factors(tmp_path):
    cfg = LoraConfig(rank=2, alpha=4, targets=["Dense_0", "out"])
    wrapped = jax_lora.wrap(_Partitioned(), cfg)
    x = jnp.ones((1, 6))
    boxed = wrapped.init(jax.random.key(0), x)["lora"]  # factors inherit the kernels' boxes
    assert isinstance(boxed["out"]["a"], nn.meta.AxisMetadata)
    names = jax_lora.export_peft(tmp_path / "ad", boxed, cfg)
    assert names == ["Dense_0", "out"]
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    np.testing.assert_array_equal(
        t["base_model.model.out.lora_A.weight"], np.asarray(boxed["out"]["a"].unbox()).T
    )
    params = nn.meta.unbox(_Partitioned().init(jax.random.key(1), x))
    fresh = jax_lora.init_lora(wrapped, jax.random.key(2), params, x)
    jax_lora.export_peft(tmp_path / "ad2", fresh, cfg)
    back, _ = jax_lora.import_peft(tmp_path / "ad", like=boxed)  # `like` may be boxed too
    assert back["Dense_0"]["a"].shape == (6, 2) and back["out"]["b"].shape == (2, 4)


def test_fan_in_fan_out_changes_no_factor(tmp_path):
    # GPT-2's Conv1D adapters: PEFT's lora_A (r, in) / lora_B (out, r) are the same as for a
    # Linear, fan_in_fan_out only says how PEFT reads the base weight
    lora = {"c_attn": {"kernel": _small(rank=2)}}
    names = jax_lora.export_peft(tmp_path, lora, LoraConfig(rank=2), fan_in_fan_out=True)
    assert names == ["c_attn"]
    assert json.loads(_raw_config(tmp_path))["fan_in_fan_out"] is True
    back, _ = jax_lora.import_peft(tmp_path, like=lora)
    jax.tree.map(np.testing.assert_array_equal, back, lora)


def test_missing_lora_alpha_takes_peft_default_8(tmp_path):
    jax_lora.export_peft(tmp_path, {"q": _small(rank=2)}, LoraConfig(rank=2, alpha=2))
    _edit_config(tmp_path, lora_alpha=_DROP)
    _, cfg = jax_lora.import_peft(tmp_path)
    assert (cfg.rank, cfg.alpha, cfg.scale) == (2, 8.0, 4.0)


def _raw_config(directory):
    return (directory / "adapter_config.json").read_text()


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"peft_type": "LORA", "r": ', "not valid JSON"),
        ("", "not valid JSON"),
        ('["LORA", 2]', "a JSON object"),
    ],
)
def test_malformed_config_json(tmp_path, text, match):
    jax_lora.export_peft(tmp_path, {"q": _small()}, LoraConfig(rank=2))
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        jax_lora.import_peft(tmp_path)
    assert str(tmp_path) in str(e.value) and "adapter_config.json" in str(e.value)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"r": 8}, r"`r`=8 .* 'q' has lora_A.weight \(2, 3\)"),
        ({"r": _DROP}, r"`r` .*PEFT's default 8.* 'q' has lora_A.weight \(2, 3\)"),
        ({"r": "2"}, r"`r`='2'"),
        ({"r": True}, r"`r`=True"),
        ({"r": 0}, r"`r`=0"),
        ({"lora_alpha": "big"}, r"`lora_alpha`='big'"),
        ({"lora_dropout": 1.5}, r"`lora_dropout`=1.5"),
        ({"use_rslora": "yes"}, r"`use_rslora`='yes'"),
        ({"init_lora_weights": "pissa"}, r"`init_lora_weights`='pissa'.*residual"),
        ({"init_lora_weights": "pissa_niter_4"}, r"`init_lora_weights`='pissa_niter_4'"),
        ({"init_lora_weights": "olora"}, r"`init_lora_weights`='olora'"),
        ({"init_lora_weights": "corda"}, r"`init_lora_weights`='corda'"),
        ({"init_lora_weights": "loftq"}, r"`init_lora_weights`='loftq'"),
        ({"init_lora_weights": "something_new"}, r"`init_lora_weights`='something_new'"),
        ({"target_parameters": ["experts.down_proj"]}, "`target_parameters`"),
        ({"alora_invocation_tokens": [1, 2]}, "`alora_invocation_tokens`"),
        ({"use_bdlora": {"nblocks": 2}}, "`use_bdlora`"),
        ({"arrow_config": {"top_k": 3}}, "`arrow_config`"),
        ({"kasa_config": {"x": 1}}, "`kasa_config`"),
        ({"monteclora_config": {"n": 1}}, "`monteclora_config`"),
        ({"some_future_switch": True}, "unknown field `some_future_switch`=True"),
    ],
)
def test_config_fields_that_change_the_math_are_refused(tmp_path, fields, match):
    jax_lora.export_peft(tmp_path, {"q": _small(rank=2)}, LoraConfig(rank=2))
    _edit_config(tmp_path, **fields)
    with pytest.raises(ValueError, match=match) as e:
        jax_lora.import_peft(tmp_path)
    assert str(tmp_path) in str(e.value) and "adapter_config.json" in str(e.value)


def test_harmless_and_default_fields_are_accepted(tmp_path):
    q = _small(rank=2)
    jax_lora.export_peft(tmp_path, {"q": q}, LoraConfig(rank=2, alpha=4))
    _edit_config(
        tmp_path,
        init_lora_weights="gaussian",  # init-only: the trained factors are plain LoRA
        eva_config={"rho": 2.0},
        loftq_config={},
        target_modules=["q"],
        exclude_modules=None,
        revision="main",
        peft_version="0.99.0",
        some_future_switch=None,  # an unknown field at a falsy default changes nothing
        another_future_list=[],
        task_type="CAUSAL_LM",
    )
    back, cfg = jax_lora.import_peft(tmp_path)
    np.testing.assert_array_equal(back["q"]["a"], q["a"])
    assert (cfg.rank, cfg.alpha) == (2, 4.0)
    _edit_config(tmp_path, r=_DROP)  # PEFT's default r=8 does not fit rank-2 tensors ...
    with pytest.raises(ValueError, match="`r`"):
        jax_lora.import_peft(tmp_path)
    jax_lora.export_peft(tmp_path, {"q": _small(rank=8, fan_in=9, fan_out=9)}, LoraConfig(rank=8))
    _edit_config(tmp_path, r=_DROP)  # ... but fits rank-8 ones, as PEFT would load it
    assert jax_lora.import_peft(tmp_path)[1].rank == 8


def test_factor_ranks_must_agree(tmp_path):
    jax_lora.export_peft(tmp_path, {"q": _small(rank=2)}, LoraConfig(rank=2))
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    t["base_model.model.q.lora_B.weight"] = np.zeros((5, 3), np.float32)
    save_file(t, f)
    with pytest.raises(
        ValueError,
        match=r"`r`=2 does not fit .*'q' has lora_A.weight \(2, 3\) and lora_B.weight \(5, 3\)",
    ) as e:
        jax_lora.import_peft(tmp_path)
    assert "adapter_model.safetensors" in str(e.value)


@pytest.mark.parametrize("cut", [0, 7, -3])
def test_corrupt_safetensors_named(tmp_path, cut):
    jax_lora.export_peft(tmp_path, {"q": _small()}, LoraConfig(rank=2))
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:cut])
    with pytest.raises(ValueError, match="adapter_model.safetensors") as e:
        jax_lora.import_peft(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_export_refuses_a_folder_that_is_not_an_adapter(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_1").write_text("weights")
    (run / "train_log.txt").write_text("step 1 loss 3.2")
    with pytest.raises(ValueError, match=r"train_log.txt.*overwrite=True") as e:
        jax_lora.export_peft(run, {"q": _small()}, LoraConfig(rank=2))
    assert str(run) in str(e.value)
    assert (run / "train_log.txt").read_text() == "step 1 loss 3.2"
    assert (run / "checkpoints" / "step_1").read_text() == "weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    jax_lora.export_peft(run, {"q": _small()}, LoraConfig(rank=2), overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # an adapter folder (PEFT's README.md included) and an empty folder are replaced
    (run / "README.md").write_text("# adapter")
    jax_lora.export_peft(run, {"q": _small(seed=1)}, LoraConfig(rank=2))
    np.testing.assert_array_equal(jax_lora.import_peft(run)[0]["q"]["a"], _small(seed=1)["a"])
    (tmp_path / "empty").mkdir()
    jax_lora.export_peft(tmp_path / "empty", {"q": _small()}, LoraConfig(rank=2))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        jax_lora.export_peft(tmp_path / "file", {"q": _small()}, LoraConfig(rank=2))


def test_export_refuses_two_layers_with_one_torch_name(tmp_path):
    lora = {"enc": {"q": _small(), "k": _small(seed=1)}}
    with pytest.raises(ValueError, match=r"'enc/k' and 'enc/q' .* 'proj'"):
        jax_lora.export_peft(tmp_path / "ad", lora, LoraConfig(rank=2), torch_name=lambda p: "proj")
    assert not (tmp_path / "ad").exists()


def test_import_refuses_colliding_flax_paths(tmp_path):
    lora = {"enc": {"q": _small(), "k": _small(seed=1)}}
    jax_lora.export_peft(tmp_path, lora, LoraConfig(rank=2))
    with pytest.raises(ValueError, match=r"'enc.k' and 'enc.q' .* 'enc/x'"):
        jax_lora.import_peft(tmp_path, flax_path=lambda n: "enc/x")
    with pytest.raises(ValueError, match=r"'enc.k' \(Flax 'enc'\) .* 'enc.q' \(Flax 'enc/head'\)"):
        jax_lora.import_peft(tmp_path, flax_path={"enc.k": "enc", "enc.q": "enc/head"})


def _scanned():
    import test_scan_sharding as ts

    cfg = LoraConfig(rank=4, alpha=8)
    x = jnp.ones((1, 2, ts.D))
    shapes = jax.eval_shape(jax_lora.wrap(ts.Scanned(), cfg).init, jax.random.key(0), x)["lora"]
    rng = np.random.default_rng(0)
    lora = jax.tree.map(lambda t: rng.standard_normal(t.shape).astype(np.float32), shapes)
    return ts, cfg, lora


def test_stacked_factors_export_as_per_layer_modules(tmp_path):
    ts, cfg, lora = _scanned()  # blocks/fc1: a (3, 16, 4), b (3, 4, 32)
    names = jax_lora.export_peft(tmp_path / "s", lora, cfg, stacked={"blocks": "block_{i}"})
    assert names == [f"block_{i}.fc{j}" for i in range(ts.L) for j in (1, 2)]
    jax_lora.export_peft(tmp_path / "u", ts._unstack(lora), cfg)  # the unrolled model's export
    s = load_file(tmp_path / "s" / "adapter_model.safetensors")
    u = load_file(tmp_path / "u" / "adapter_model.safetensors")
    assert s.keys() == u.keys()
    for k in u:
        np.testing.assert_array_equal(s[k], u[k])
    back, _ = jax_lora.import_peft(tmp_path / "s", like=lora, stacked={"blocks": "block_{i}"})
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, lora))
    with pytest.raises(ValueError, match=r"`stacked` key 'layers' .* no factors"):
        jax_lora.export_peft(tmp_path / "x", lora, cfg, stacked={"layers": "layer_{i}"})


def test_stacked_factors_are_never_guessed_from_shapes(tmp_path):
    # 2 layers of rank 2: a (2, 8, 2), b (2, 2, 8) fit the rank check of one 16 -> 16 layer too
    rng = np.random.default_rng(0)
    lora = {
        "layers": {
            "q": {
                "a": rng.standard_normal((2, 8, 2)).astype(np.float32),
                "b": rng.standard_normal((2, 2, 8)).astype(np.float32),
            }
        }
    }
    with pytest.raises(
        ValueError, match=r"'layers/q' .* a stack of 2 layers.*`stacked=\{'layers': "
    ):
        jax_lora.export_peft(tmp_path / "ad", lora, LoraConfig(rank=2))
    assert not (tmp_path / "ad").exists()
    # L != rank: the rank check fails, and says how to export a stack
    lora["layers"]["q"] = {"a": np.ones((3, 8, 2), np.float32), "b": np.ones((3, 2, 8), np.float32)}
    with pytest.raises(ValueError, match=r"`config.rank` is 2.*`stacked="):
        jax_lora.export_peft(tmp_path / "ad", lora, LoraConfig(rank=2))
    names = jax_lora.export_peft(
        tmp_path / "ad", lora, LoraConfig(rank=2), stacked={"layers": "layers/{i}"}
    )
    assert names == ["layers.0.q", "layers.1.q", "layers.2.q"]
    # a genuine (2, 8) -> (2, 8) DenseGeneral of rank 2 is declared unstacked with None
    lora["layers"]["q"] = {"a": np.ones((2, 8, 2), np.float32), "b": np.ones((2, 2, 8), np.float32)}
    names = jax_lora.export_peft(
        tmp_path / "ad", lora, LoraConfig(rank=2), stacked={"layers": None}
    )
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert t["base_model.model.layers.q.lora_A.weight"].shape == (2, 16)


def _umask():
    with open("/proc/self/status") as f:
        return int(next(x for x in f if x.startswith("Umask:")).split()[1], 8)


def test_export_modes_follow_the_umask(tmp_path):
    umask = _umask()
    jax_lora.export_peft(tmp_path / "ad", {"q": _small()}, LoraConfig(rank=2))
    assert (tmp_path / "ad").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "ad" / f).stat().st_mode & 0o777 == 0o666 & ~umask
    (tmp_path / "ad").chmod(0o750)  # a replaced folder keeps the mode its owner gave it
    jax_lora.export_peft(tmp_path / "ad", {"q": _small(seed=1)}, LoraConfig(rank=2))
    assert (tmp_path / "ad").stat().st_mode & 0o777 == 0o750


def _versions():
    """Two adapters that differ in every file: rank, alpha, shapes and values."""
    out = []
    for v, rank in ((1, 2), (2, 4)):
        rng = np.random.default_rng(v)
        lora = {
            "q": {
                "a": rng.standard_normal((6, rank)).astype(np.float32),
                "b": rng.standard_normal((rank, 5)).astype(np.float32),
            }
        }
        out.append((lora, LoraConfig(rank=rank, alpha=float(10 * v))))
    return out


def _which_version(directory):
    """0 or 1 if ``directory`` holds one of `_versions` complete and consistent, else raise."""
    raw = json.loads((directory / "adapter_config.json").read_text())
    t = load_file(directory / "adapter_model.safetensors")
    for v, (lora, cfg) in enumerate(_versions()):
        if raw["r"] == cfg.rank and raw["lora_alpha"] == cfg.alpha:
            np.testing.assert_array_equal(t["base_model.model.q.lora_A.weight"], lora["q"]["a"].T)
            np.testing.assert_array_equal(t["base_model.model.q.lora_B.weight"], lora["q"]["b"].T)
            return v
    raise AssertionError(f"{directory} holds neither version: {raw}")


# Runs in a fresh process (no JAX backend started, so fork is safe): for each try, put version 0
# at `ad`, fork a child that exports version 1 there and is SIGKILLed either just before its
# k-th file-system call (every k, so every step of the export is a kill point) or after a random
# delay; copy what `ad` then holds to `snapshots/<try>`.
_KILL_WORKER = r"""
import builtins, glob, json, os, random, shutil, signal, sys, threading, time
import test_peft as tp
import jax_lora
from jax_lora import peft

root = sys.argv[1]
ad, snaps = os.path.join(root, "ad"), os.path.join(root, "snapshots")
(old, old_cfg), (new, new_cfg) = tp._versions()
HOOKED = [(os, n) for n in ("mkdir", "rename", "replace", "open", "close", "fsync", "chmod",
                            "rmdir", "unlink", "scandir", "listdir", "stat", "lstat")]
HOOKED += [(builtins, "open")] + [(peft, "_exchange")] * hasattr(peft, "_exchange")

def child(kill_at, delay):
    calls = [0]
    def hook(real):
        def f(*a, **k):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        return f
    for mod, name in HOOKED:
        setattr(mod, name, hook(getattr(mod, name)))
    if delay is not None:
        threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL)).start()
    jax_lora.export_peft(ad, new, new_cfg)
    os._exit(min(calls[0], 250))

def attempt(kill_at, delay=None):
    jax_lora.export_peft(ad, old, old_cfg)
    for stray in glob.glob(os.path.join(root, ".ad.peft-*")):
        shutil.rmtree(stray)
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        try:
            child(kill_at, delay)
        finally:
            os._exit(255)  # never run the parent's code in the child
    _, status = os.waitpid(pid, 0)
    took = time.perf_counter() - t0
    tries.append(status)
    if os.path.lexists(ad):
        shutil.copytree(ad, os.path.join(snaps, str(len(tries))))
    return status, took

os.makedirs(snaps)
tries = []
status, took = attempt(kill_at=0)  # a full export: how many calls, how long
n_calls = os.waitstatus_to_exitcode(status)
killed = 0
for k in range(1, n_calls + 1):
    s, _ = attempt(k)
    killed += os.WIFSIGNALED(s)
random.seed(0)
for _ in range(15):
    s, _ = attempt(0, delay=random.uniform(0, 1.5 * took))
    killed += os.WIFSIGNALED(s)
json.dump({"calls": n_calls, "killed": killed, "tries": len(tries)},
          open(os.path.join(root, "report.json"), "w"))
"""


def test_export_killed_at_any_point_leaves_old_or_new_adapter(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-c", _KILL_WORKER, str(tmp_path)],
        cwd=root,
        env={**__import__("os").environ, "PYTHONPATH": str(root / "tests")},
        check=True,
        timeout=120,
    )
    report = json.loads((tmp_path / "report.json").read_text())
    snaps = sorted((tmp_path / "snapshots").iterdir(), key=lambda p: int(p.name))
    assert report["tries"] == report["calls"] + 16 >= 20
    missing = sorted(set(range(1, report["tries"] + 1)) - {int(s.name) for s in snaps})
    assert not missing, f"`ad` was gone after tries {missing}"
    assert report["killed"] >= report["calls"]
    seen = [_which_version(s) for s in snaps]
    assert seen[0] == 1 and {0, 1} <= set(seen)  # both outcomes occur, both complete
    assert all(sorted(p.name for p in s.iterdir()) == _ADAPTER for s in snaps)


_ADAPTER = ["adapter_config.json", "adapter_model.safetensors"]


def test_fallback_swap_puts_the_old_adapter_back(tmp_path, monkeypatch):
    """Without renameat2 (other OSes, some file systems) the swap is two renames; if the second
    fails, the old adapter is renamed back and nothing is left behind."""
    import errno
    import os

    from jax_lora import peft

    (old, old_cfg), (new, new_cfg) = _versions()
    jax_lora.export_peft(tmp_path / "ad", old, old_cfg)

    def no_exchange(a, b):
        raise OSError(errno.EINVAL, "no RENAME_EXCHANGE here")

    monkeypatch.setattr(peft, "_exchange", no_exchange)
    real_rename, calls = os.rename, []

    def failing_second_rename(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "disk on fire")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_second_rename)
    with pytest.raises(OSError, match="disk on fire"):
        jax_lora.export_peft(tmp_path / "ad", new, new_cfg)
    assert _which_version(tmp_path / "ad") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    monkeypatch.setattr(os, "rename", real_rename)
    jax_lora.export_peft(tmp_path / "ad", new, new_cfg)  # the fallback itself works
    assert _which_version(tmp_path / "ad") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
