"""Smoke tests: each example runs end to end with tiny settings and reports what it claims."""

import pathlib
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
