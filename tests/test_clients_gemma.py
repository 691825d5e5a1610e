"""jax_lora on google-deepmind's gemma, from the main suite.

gemma 4.x needs Python >= 3.12, so its tests (tests/clients/gemma_lora_test.py) run in a
separate venv that `.ci/gemma_venv.sh` builds once (about 3.5 minutes, then a few seconds) at
``$JAX_LORA_GEMMA_VENV`` (default /tmp/jax_lora_gemma_venv); this test runs them with that
venv's pytest and asserts they passed. It skips only when python3.12 or the packages cannot be
installed on this machine.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("JAX_LORA_GEMMA_VENV", "/tmp/jax_lora_gemma_venv"))
NO_PYTHON, INSTALL_FAILED = 3, 4  # .ci/gemma_venv.sh exit codes


def _env() -> dict[str, str]:
    # the gemma venv must not see the main venv's paths
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop}


def test_gemma_client_suite_passes_in_its_venv():
    build = subprocess.run(
        ["bash", str(REPO / ".ci" / "gemma_venv.sh"), str(VENV)],
        capture_output=True,
        text=True,
        timeout=1500,
        env=_env(),
    )
    if build.returncode == NO_PYTHON:
        pytest.skip(f"gemma needs Python 3.12, not available here: {build.stderr.strip()}")
    if build.returncode == INSTALL_FAILED:
        pytest.skip(f"the gemma venv could not be installed: {build.stderr.strip()[-2000:]}")
    assert build.returncode == 0, f".ci/gemma_venv.sh {VENV} failed:\n{build.stderr[-4000:]}"

    run = subprocess.run(
        [str(VENV / "bin" / "python"), "-m", "pytest", "tests/clients/gemma_lora_test.py"]
        + ["tests/clients/gemma_quant_test.py"]  # the same model on an nf4 base
        + ["-q", "-rA", "-p", "no:cacheprovider"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=_env(),
    )
    report = run.stdout[-8000:] + run.stderr[-2000:]
    assert run.returncode == 0, report
    summary = run.stdout.strip().splitlines()[-1]
    assert re.search(r"\b[1-9]\d* passed\b", summary), report
    assert not re.search(r"skipped|xfail|error|failed", summary), report
