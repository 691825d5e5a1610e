"""`import jax_lora` stays light: orbax (adapter checkpoints) loads on first use, and every
name in `jax_lora.__all__` still resolves, by attribute and by ``from jax_lora import X``."""

import importlib
import json
import os
import subprocess
import sys

import pytest

import jax_lora

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("orbax", "orbax.checkpoint", "tensorstore")


def _fresh(code: str) -> dict:
    """Run ``code`` in a fresh interpreter from this checkout; -> the JSON it prints last."""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_does_not_load_orbax_until_checkpointer_is_used():
    got = _fresh(
        "import json, sys\n"
        "import jax_lora\n"
        f"before = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "from jax_lora import AdapterCheckpointer\n"
        f"after = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'before': before, 'after': after, 'cls': AdapterCheckpointer.__name__}))"
    )
    assert got["before"] == []  # nothing heavy at import
    assert got["after"] == list(HEAVY)  # ... and it all loads on first use
    assert got["cls"] == "AdapterCheckpointer"


@pytest.mark.parametrize("name", jax_lora.__all__)
def test_every_public_name_resolves_to_its_defining_object(name):
    obj = getattr(jax_lora, name)
    # `from jax_lora import name` goes through the same module __getattr__
    ns: dict = {}
    exec(f"from jax_lora import {name} as x", ns)
    assert ns["x"] is obj
    module = getattr(obj, "__module__", None)
    if module is not None and module.startswith("jax_lora."):  # a class or function
        assert getattr(importlib.import_module(module), name) is obj
    assert name in dir(jax_lora)


def test_lazy_names_are_public_and_unique():
    assert len(set(jax_lora.__all__)) == len(jax_lora.__all__)
    assert set(jax_lora._LAZY) <= set(jax_lora.__all__)


def test_unknown_name_raises_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="jax_lora.*no_such_thing"):
        jax_lora.no_such_thing  # noqa: B018


def test_lazy_submodules_are_attributes_as_before():
    got = _fresh(
        "import json\n"
        "import jax_lora\n"
        "ck, pf = jax_lora.checkpoint, jax_lora.peft\n"
        "print(json.dumps([ck.__name__, callable(ck.config_to_json), pf.__name__]))"
    )
    assert got == ["jax_lora.checkpoint", True, "jax_lora.peft"]
