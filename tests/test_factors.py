"""Factor initialisations against their formulas, and the Einsum split."""

import math

import jax
import numpy as np
import pytest
from scipy import stats

from jax_lora import LoraConfig, factors


def _geom(fan_in=256, fan_out=64):
    return factors.dense_geometry((3, fan_in), fan_out)


@pytest.mark.parametrize(
    "init, dist",
    [
        ("peft", lambda fan_in, r: stats.uniform(-1 / math.sqrt(fan_in), 2 / math.sqrt(fan_in))),
        ("gaussian", lambda fan_in, r: stats.norm(0, 1 / r)),
        ("seed", lambda fan_in, r: stats.norm(0, 1)),
    ],
)
def test_init_distribution(init, dist):
    rank, fan_in = 16, 256
    cfg = LoraConfig(rank=rank, init=init)
    geom = _geom(fan_in)
    a = np.asarray(factors.init_a(jax.random.key(0), geom, cfg))
    b = np.asarray(factors.init_b(geom, cfg))
    assert a.shape == (fan_in, rank) and a.dtype == np.float32
    assert b.shape == (rank, 64) and not b.any()
    # 4096 samples: a KS p-value below 1e-3 would mean the wrong distribution.
    assert stats.kstest(a.ravel(), dist(fan_in, rank).cdf).pvalue > 1e-3
    if init == "peft":
        assert np.abs(a).max() <= 1 / math.sqrt(fan_in)


def test_init_callable():
    cfg = LoraConfig(rank=2, init=lambda key, shape, dtype: np.full(shape, 0.5, dtype))
    a = factors.init_a(jax.random.key(0), _geom(8, 8), cfg)
    assert np.array_equal(np.asarray(a), np.full((8, 2), 0.5, np.float32))


def test_einsum_geometry_split():
    g = factors.einsum_geometry("btd,dnh->btnh", (8, 2, 4), "p")
    assert (g.in_shape, g.out_shape) == ((8,), (2, 4))
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32)
    a = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    b = np.random.default_rng(2).normal(size=(2, 2, 4)).astype(np.float32)
    got = factors.branch(jax.numpy.asarray(x), a, b, g, 0.5)
    want = 0.5 * np.einsum("btd,dnh->btnh", x, np.einsum("dr,rnh->dnh", a, b))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "eq, shape, text",
    [
        ("bnd,ndh->bnh", (2, 8, 4), "per-slice kernel"),
        ("bd,hd->bh", (4, 8), "output axes"),
        ("bd,de->b", (8, 4), "sums kernel axis"),
        ("bd->bh", (8, 4), "cannot parse"),
    ],
)
def test_einsum_geometry_rejects(eq, shape, text):
    with pytest.raises(ValueError, match=text) as e:
        factors.einsum_geometry(eq, shape, "enc/proj")
    assert "enc/proj" in str(e.value)
