"""Factor initialisations against their formulas, the Einsum split, and per-slice factors of
``DenseGeneral(batch_dims=...)`` / ``LinearGeneral(batch_axis=...)``."""

import math

import flax.linen as nn
import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx
from scipy import stats

import jax_lora
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


# --- batch_dims / batch_axis: one pair of factors per slice -------------------------------

N_SLICES, ROWS, IN, OUT, RANK, SCALE = 2, 6, (4, 3), (5, 3), 2, 1.5


def _per_slice_reference(x, kernel, bias, a, b):
    """``y[s] = x[s] @ W[s] + bias[s] + scale * (x[s] @ a[s]) @ b[s]``, float64 numpy loops."""
    x, kernel, bias, a, b = (np.asarray(t, np.float64) for t in (x, kernel, bias, a, b))
    fan_in, fan_out = math.prod(IN), math.prod(OUT)
    out = np.zeros((N_SLICES, ROWS) + OUT)
    for s in range(N_SLICES):
        xs = x[s].reshape(ROWS, fan_in)
        w = kernel[s].reshape(fan_in, fan_out)
        delta = (xs @ a[s].reshape(fan_in, RANK)) @ b[s].reshape(RANK, fan_out)
        out[s] = (xs @ w + bias[s].reshape(fan_out) + SCALE * delta).reshape((ROWS,) + OUT)
    return out


def _batched_inputs():
    g = np.random.default_rng(0)
    x = g.normal(size=(N_SLICES, ROWS) + IN).astype(np.float32)
    a = g.normal(size=(N_SLICES,) + IN + (RANK,)).astype(np.float32)
    b = g.normal(size=(N_SLICES, RANK) + OUT).astype(np.float32)
    return x, a, b


_CFG = LoraConfig(rank=RANK, alpha=RANK * SCALE)


@pytest.mark.parametrize("jit", [False, True])
def test_linen_dense_general_batch_dims_per_slice_factors(jit):
    x, a, b = _batched_inputs()
    wrapped = jax_lora.wrap(nn.DenseGeneral(OUT, axis=(-2, -1), batch_dims=(0,)), _CFG)
    v = wrapped.init(jax.random.key(0), x)
    assert v["lora"]["a"].shape == a.shape and v["lora"]["b"].shape == b.shape
    v["lora"] = {"a": a, "b": b}
    apply = jax.jit(wrapped.apply) if jit else wrapped.apply
    got = np.asarray(apply(v, x))
    p = v["params"]
    want = _per_slice_reference(x, p["kernel"], p["bias"], a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("jit", [False, True])
def test_nnx_linear_general_batch_axis_per_slice_factors(jit):
    x, a, b = _batched_inputs()
    layer = nnx.LinearGeneral(IN, OUT, axis=(-2, -1), batch_axis={0: N_SLICES}, rngs=nnx.Rngs(0))
    kernel = np.asarray(layer.kernel.get_value())
    bias = np.random.default_rng(3).normal(size=(N_SLICES,) + OUT).astype(np.float32)
    layer.bias.set_value(jax.numpy.asarray(bias))
    model = jax_lora.wrap(layer, _CFG, rngs=nnx.Rngs(1))
    assert model.lora_a.get_value().shape == a.shape
    assert model.lora_b.get_value().shape == b.shape
    model.lora_a.set_value(jax.numpy.asarray(a))
    model.lora_b.set_value(jax.numpy.asarray(b))
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, x) if jit else model(x))
    want = _per_slice_reference(x, kernel, bias, a, b)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_delta_kernel_per_slice():
    _, a, b = _batched_inputs()
    got = np.asarray(factors.delta_kernel(a, b, SCALE, kernel_ndim=1 + len(IN) + len(OUT)))
    want = np.stack(
        [SCALE * np.tensordot(a[s].astype(np.float64), b[s], axes=1) for s in range(N_SLICES)]
    )
    assert got.shape == (N_SLICES,) + IN + OUT
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _dot_ranks(jaxpr) -> list[tuple[int, int]]:
    """Operand ranks of every dot_general in a jaxpr (sub-jaxprs included)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(tuple(v.aval.ndim for v in eqn.invars))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dot_ranks(sub)
    return out


@pytest.mark.parametrize(
    "x_shape,axis,features",
    [((3, 5, 6), (-1,), (4,)), ((2, 3, 5, 6), (-2, -1), (4, 2)), ((6,), (-1,), (4,))],
)
def test_branch_dense_is_2d_matmuls(x_shape, axis, features):
    """The Dense branch and its gradients are 2-D matmuls over flattened tokens (XLA:CPU runs
    `x.T @ dh` over a 3-D `x` several times slower), with values and gradients equal to an
    independent einsum (fp32, rtol 1e-5)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=x_shape).astype(np.float32)
    geom = factors.dense_geometry(x.shape, features, axis)
    a = rng.normal(size=geom.a_shape + (3,)).astype(np.float32)
    b = rng.normal(size=(3,) + geom.out_shape).astype(np.float32)
    hi = jax.lax.Precision.HIGHEST

    def ours(x, a, b):
        return factors.branch(x, a, b, geom, 0.5, hi)

    def ref(x, a, b):
        n_in = len(geom.in_shape)
        x2 = x.reshape(x.shape[: x.ndim - n_in] + (-1,))
        y = np.float32(0.5) * (x2 @ a.reshape(-1, 3)) @ b.reshape(3, -1)
        return y.reshape(x.shape[: x.ndim - n_in] + geom.out_shape)

    w = rng.normal(size=x.shape[: x.ndim - len(geom.in_shape)] + geom.out_shape).astype(np.float32)
    np.testing.assert_allclose(ours(x, a, b), ref(x, a, b), rtol=1e-5, atol=1e-5)
    g_ours = jax.grad(lambda *t: (ours(*t) * w).sum(), argnums=(0, 1, 2))(x, a, b)
    g_ref = jax.grad(
        lambda *t: jax.numpy.einsum("...,...->", ref(*t), w, precision=hi), argnums=(0, 1, 2)
    )(x, a, b)
    for go, gr in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(go, gr, rtol=1e-5, atol=1e-5)
    jaxpr = jax.make_jaxpr(jax.grad(lambda *t: (ours(*t) * w).sum(), argnums=(0, 1, 2)))(x, a, b)
    ranks = _dot_ranks(jaxpr.jaxpr)
    assert len(ranks) == 6 and all(r == (2, 2) for r in ranks), ranks
