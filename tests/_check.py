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


def perturbed(tree, seed: int = 11):
    """``tree``'s leaves moved off their init by 0.05·N(0, 1) (key ``seed``, one subkey per
    leaf): b = 0 at init would hide a missing LoRA branch."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )
