"""`export_peft`/`import_peft` ``stacked`` templates: a template that cannot round-trip is
refused at export (and at import), naming the key, the template and what is wrong with it."""

import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

import jax_lora
from jax_lora import LoraConfig

CFG = LoraConfig(rank=4)


def _stack():
    """A stack of 2 layers under ``blocks`` (a (2, 16, 4), b (2, 4, 8)) and one plain layer."""
    rng = np.random.default_rng(0)

    def node(*lead):
        return {
            "a": rng.standard_normal((*lead, 16, 4)).astype(np.float32),
            "b": rng.standard_normal((*lead, 4, 8)).astype(np.float32),
        }

    return {"blocks": {"fc": node(2)}, "head": node()}


def _files(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# (template, what the error says is wrong, the template it suggests or None)
BAD = [
    ("layers.{i}", "has a '.'", "layers/{i}"),
    ("model.layers.{i}.mlp", "has a '.'", "model/layers/{i}/mlp"),
    ("layers/{i}/", "empty part", "layers/{i}"),
    ("/layers/{i}", "empty part", "layers/{i}"),
    ("layers//{i}", "empty part", "layers/{i}"),
    ("layers", "holds '{i}' 0 times", None),
    ("layers/{i}/{i}", "holds '{i}' 2 times", None),
    ("layers/{j}", "holds '{i}' 0 times", None),
    ("layers/{i}/{j}", "braces other than", None),
    ("layers/{i:02d}", "holds '{i}' 0 times", None),
    ("layers/{i}}", "braces other than", None),
]


@pytest.mark.parametrize(("template", "problem", "suggest"), BAD)
def test_export_refuses_a_bad_template_by_name_and_keeps_the_old_adapter(
    tmp_path, template, problem, suggest
):
    lora = _stack()
    good = jax_lora.export_peft(tmp_path / "ad", lora, CFG, stacked={"blocks": "layers/{i}"})
    assert good == ["head", "layers.0.fc", "layers.1.fc"]
    before = _files(tmp_path / "ad")
    with pytest.raises(ValueError) as err:
        jax_lora.export_peft(tmp_path / "ad", lora, CFG, stacked={"blocks": template})
    msg = str(err.value)
    assert f"`stacked`['blocks'] is {template!r}" in msg
    assert problem in msg
    if suggest is not None:
        assert f"did you mean {suggest!r}" in msg
    assert _files(tmp_path / "ad") == before  # the failed export changed nothing


@pytest.mark.parametrize(("template", "problem", "suggest"), BAD[:3])
def test_import_refuses_the_same_bad_templates(tmp_path, template, problem, suggest):
    jax_lora.export_peft(tmp_path / "ad", _stack(), CFG, stacked={"blocks": "layers/{i}"})
    with pytest.raises(ValueError, match=re.escape(f"`stacked`['blocks'] is {template!r}")):
        jax_lora.import_peft(tmp_path / "ad", stacked={"blocks": template})


@pytest.mark.parametrize("with_like", [False, True])
def test_import_names_a_template_that_matches_no_module(tmp_path, with_like):
    lora = _stack()
    jax_lora.export_peft(tmp_path / "ad", lora, CFG, stacked={"blocks": "h/{i}"})
    like = lora if with_like else None
    # before the fix: without `like` the layers silently came back unstacked as 'layers/0/fc'
    # (here 'h/0/fc'), with `like` the error named a missing factor, not the template
    with pytest.raises(ValueError) as err:
        jax_lora.import_peft(tmp_path / "ad", like=like, stacked={"blocks": "layers/{i}"})
    msg = str(err.value)
    assert "`stacked`['blocks'] is 'layers/{i}'" in msg
    assert f"matches no module of the adapter in {tmp_path / 'ad'}" in msg
    assert "'h/0/fc'" in msg  # shows what the adapter's paths look like


def test_export_refuses_a_key_that_names_no_stack(tmp_path):
    lora = _stack()
    # a '.' in the key: no Flax path has one, so it names nothing
    with pytest.raises(ValueError, match=r"`stacked` key 'blocks\.fc' names no factors"):
        jax_lora.export_peft(tmp_path / "ad", lora, CFG, stacked={"blocks.fc": "layers/{i}"})
    # a key on plain (unstacked) factors
    with pytest.raises(ValueError, match=r"'head' .* are not a stack: `stacked` key 'head'"):
        jax_lora.export_peft(
            tmp_path / "ad", lora, CFG, stacked={"blocks": "layers/{i}", "head": "head_{i}"}
        )
    assert not (tmp_path / "ad").exists()


@pytest.mark.parametrize(
    ("template", "names"),
    [
        ("block_{i}", ["block_0.fc", "block_1.fc", "head"]),
        ("{i}", ["0.fc", "1.fc", "head"]),
        ("model/layers/{i}/mlp", ["head", "model.layers.0.mlp.fc", "model.layers.1.mlp.fc"]),
    ],
)
def test_good_templates_round_trip(tmp_path, template, names):
    lora = _stack()
    assert jax_lora.export_peft(tmp_path / "ad", lora, CFG, stacked={"blocks": template}) == names
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    # layer 1 of the stack is module names[1] (or [2]): lora_A (r, in) = a[1].T
    layer1 = [n for n in names if n != "head"][1]
    np.testing.assert_array_equal(
        t[f"base_model.model.{layer1}.lora_A.weight"], lora["blocks"]["fc"]["a"][1].T
    )
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == names
    back, _ = jax_lora.import_peft(tmp_path / "ad", like=lora, stacked={"blocks": template})
    for path in (("blocks", "fc"), ("head",)):
        for ab in "ab":
            want = lora[path[0]][path[1]][ab] if len(path) == 2 else lora["head"][ab]
            got = back[path[0]][path[1]][ab] if len(path) == 2 else back["head"][ab]
            np.testing.assert_array_equal(got, want)


def test_a_template_that_is_not_a_string_is_refused_by_key(tmp_path):
    with pytest.raises(TypeError, match=r"`stacked`\['blocks'\] is 3; expected a per-layer path"):
        jax_lora.export_peft(tmp_path / "ad", _stack(), CFG, stacked={"blocks": 3})
