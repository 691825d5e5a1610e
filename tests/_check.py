"""Tolerance checks that scale with the data: error relative to the largest reference value."""

import jax
import numpy as np


def max_rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def assert_close(got, want, rel: float = 1e-5) -> None:
    """max|got - want| <= rel * max|want|, leaf by leaf for pytrees."""
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        err = max_rel_err(g, w)
        assert err <= rel, f"max-abs error / max|want| = {err:.3g} > {rel:.3g}"
