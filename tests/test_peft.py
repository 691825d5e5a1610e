"""PEFT-format export/import without torch: files, layouts, round trips and refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _models import Encoder
from safetensors.numpy import load_file, save_file

import jax_lora
from jax_lora import LoraConfig


def _lora(cfg=None):
    cfg = cfg or LoraConfig(rank=4, alpha=8)
    v = jax_lora.wrap(Encoder(), cfg).init(jax.random.key(0), jnp.ones((1, 5, 16)))
    leaves, treedef = jax.tree.flatten(v["lora"])
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, t.shape) for k, t in zip(keys, leaves, strict=True)]
    )


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
    v = jax_lora.wrap(Encoder(), cfg2).init(jax.random.key(0), jnp.ones((1, 5, 16)))
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
        ("fan_in_fan_out", True),
        ("rank_pattern", {"q": 2}),
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
    save_file({**t, "base_model.model.emb.lora_embedding_A": np.zeros((4, 10), np.float32)}, f)
    with pytest.raises(
        ValueError, match="'base_model.model.emb.lora_embedding_A' is not a LoRA Linear factor"
    ):
        jax_lora.import_peft(tmp_path)
    save_file(t, f)
    small = _lora(LoraConfig(rank=4, targets=r".*/query"))
    with pytest.raises(ValueError, match="has factor 'head/a' .* that the model does not"):
        jax_lora.import_peft(tmp_path, like=small)
    other = _lora(LoraConfig(rank=2))
    with pytest.raises(
        ValueError, match=r"'head/a' with shape \(16, 4\), the model needs \(16, 2\)"
    ):
        jax_lora.import_peft(tmp_path, like=other)
