"""LoRA on any weight that feeds a matmul, einsum, convolution or row lookup (jax_lora/weights.py).

Every layer here is the user's own class or a flax layer that is not Dense-family. Each check
compares against an independent computation: the *base* model run with weights merged by hand
in numpy (``W + scale * einsum(a, b)`` written in the weight's stored layout per case).
"""

import dataclasses
import functools
import warnings
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from jax import lax

import jax_lora
from jax_lora import LoraConfig

KEY = jax.random.key(0)
RANK, ALPHA = 2, 3.0  # scale 1.5: a dropped or doubled scale shows


# ---------------------------------------------------------------------------------------------
# Layers written the way other libraries write them (none is a flax Dense/DenseGeneral/Einsum)


def _bias(y: jax.Array, b: jax.Array) -> jax.Array:
    return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: kernel stored ``(out, in)``, applied as ``x @ kernel.T``."""

    features: int
    kernel_init: Callable = nn.initializers.normal(0.5)

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", self.kernel_init, (self.features, x.shape[-1]))
        b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        return _bias(lax.dot_general(x, w.T, (((x.ndim - 1,), (0,)), ((), ()))), b)


class GPT2MLP(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        h = jax.nn.gelu(Conv1D(12, name="c_fc")(x))
        return Conv1D(8, name="c_proj")(h)


class Einsum(nn.Module):
    """gemma's Einsum: the equation is passed at call time, the weight is ``w``."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn: str, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.5), self.shape)
        return jnp.einsum(eqn, x, w)


class Attention(nn.Module):
    """gemma-style attention: N = K = 2 heads of size 3, model dim 8, stacked kv weight."""

    @nn.compact
    def __call__(self, x):
        q = Einsum((2, 8, 3), name="q_einsum")("BTD,NDH->BTNH", x)
        k, v = Einsum((2, 2, 8, 3), name="kv_einsum")("BSD,CKDH->CBSKH", x)
        p = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BTNS", q, k), axis=-1)
        o = jnp.einsum("BTNS,BSNH->BTNH", p, v)
        return Einsum((2, 3, 8), name="attn_vec_einsum")("BTNH,NHD->BTD", o)


class CycledEinsum(nn.Module):
    """A weight stored (D, N, H) used as 'BTNH,DNH->BTD': folding needs a 3-cycle, not a swap."""

    @nn.compact
    def __call__(self, x):
        return Einsum((8, 2, 3), name="o")("BTNH,DNH->BTD", x)


class AttnModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Attention(name="attn")(x)


class FeedForward(nn.Module):
    """gemma's FeedForward: its Einsums share its scope (``mlp/gating_einsum``, ``mlp/linear``)."""

    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, 12, 8), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NHF->...NH", x)
        h = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = Einsum((12, 8), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", h)


class FFWModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return FeedForward(name="mlp")(x)


class ConvNet(nn.Module):
    features: int
    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] | int = 1
    padding: str | tuple = "SAME"
    kernel_dilation: tuple[int, ...] | int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(
            self.features,
            self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            kernel_dilation=self.kernel_dilation,
            feature_group_count=self.groups,
            name="conv",
        )
        return conv(x)


class TiedLM(nn.Module):
    """An embedding used for the lookup and (transposed) as the output head."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(20, 8, embedding_init=nn.initializers.normal(0.5), name="emb")
        return emb.attend(jnp.tanh(emb(ids)))


class MatmulLayer(nn.Module):
    """A weight ``w`` used through a jnp entry point; ``*_t`` ops store it ``(out, in)``."""

    op: str

    @nn.compact
    def __call__(self, x):
        shape = (6, 8) if self.op.endswith("_t") else (8, 6)
        w = self.param("w", nn.initializers.normal(0.5), shape)
        if self.op == "matmul":
            return jnp.matmul(x, w)
        if self.op == "at":
            return x @ w
        if self.op == "dot":
            return jnp.dot(x, w)
        if self.op == "einsum":
            return jnp.einsum("btd,de->bte", x, w)
        if self.op == "einsum_t":
            return jnp.einsum("btd,ed->bte", x, w)
        assert self.op == "at_t"
        return x @ w.T


class MatmulNet(nn.Module):
    op: str

    @nn.compact
    def __call__(self, x):
        return MatmulLayer(self.op, name="proj")(x)


class Bf16Net(nn.Module):
    """An fp32 weight cast to bf16 and contracted with a bf16 input."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), (8, 6))
        return jnp.dot(x, w.astype(jnp.bfloat16))


class RematNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.remat(GPT2MLP)(name="block")(x)


# ---------------------------------------------------------------------------------------------
# Cases: model, input, targets, and for each adapted weight the einsum "a,b->W" that writes
# a @ b in the weight's *stored* layout, with the exact factor shapes.


@dataclasses.dataclass(frozen=True)
class Case:
    model: nn.Module
    x: Callable[[], jax.Array]
    targets: tuple[str, ...]
    spec: dict  # weight path -> (einsum a,b->W, a shape, b shape)
    rel: float = 1e-5  # output and merge tolerance (max error / max |reference|)
    grad_rel: float = 1e-5


def _np_normal(shape, seed, std=1.0, dtype=np.float32):
    # numpy, not jax.random: no compile per shape, so each case sets up in well under a second
    return jnp.asarray((std * np.random.default_rng(seed).standard_normal(shape)).astype(dtype))


def _normal(shape, seed=1, dtype=np.float32):
    return lambda: _np_normal(shape, seed, dtype=dtype)


def _gpt2_spec(prefix=""):
    return {
        f"{prefix}c_fc/kernel": ("ir,ro->oi", (8, RANK), (RANK, 12)),
        f"{prefix}c_proj/kernel": ("ir,ro->oi", (12, RANK), (RANK, 8)),
    }


def _matmul_case(op):
    eq = "ir,ro->oi" if op.endswith("_t") else "ir,ro->io"
    return Case(
        MatmulNet(op), _normal((2, 5, 8)), ("proj/w",), {"proj/w": (eq, (8, RANK), (RANK, 6))}
    )


CASES = {
    "gpt2_conv1d": Case(GPT2MLP(), _normal((2, 5, 8)), ("c_fc", "c_proj/kernel"), _gpt2_spec()),
    "gemma_attn": Case(
        AttnModel(),
        _normal((2, 5, 8)),
        ("attn/q_einsum", "attn/kv_einsum/w", "attn/attn_vec_einsum/w"),
        {
            # q (N, D, H): D is the input, N and H the output (N is not a stack)
            "attn/q_einsum/w": ("dr,rnh->ndh", (8, RANK), (RANK, 2, 3)),
            # kv (C, K, D, H): one adapter per C slice
            "attn/kv_einsum/w": ("cdr,crkh->ckdh", (2, 8, RANK), (2, RANK, 2, 3)),
            "attn/attn_vec_einsum/w": ("nhr,rd->nhd", (2, 3, RANK), (RANK, 8)),
        },
    ),
    "einsum_cycled": Case(
        CycledEinsum(),
        _normal((2, 5, 2, 3)),
        ("o/w",),
        {"o/w": ("nhr,rd->dnh", (2, 3, RANK), (RANK, 8))},
    ),
    "gemma_ffw": Case(
        FFWModel(),
        _normal((2, 5, 8)),
        ("mlp/gating_einsum", "mlp/linear"),
        {
            # gating (2, H, F) used as '...F,NHF->...NH': two stacked (F -> H) projections
            "mlp/gating_einsum": ("nfr,nrh->nhf", (2, 8, RANK), (2, RANK, 12)),
            "mlp/linear": ("hr,rf->hf", (12, RANK), (RANK, 8)),
        },
    ),
    "conv_1d": Case(
        ConvNet(6, (3,), strides=2, padding="SAME", kernel_dilation=2),
        _normal((2, 11, 4)),
        ("conv",),
        {"conv/kernel": ("kir,ro->kio", (3, 4, RANK), (RANK, 6))},
    ),
    "conv_2d": Case(
        ConvNet(5, (3, 2), strides=(1, 2), padding=((1, 0), (2, 1)), kernel_dilation=(2, 1)),
        _normal((2, 7, 6, 3)),
        ("conv/kernel",),
        {"conv/kernel": ("hwir,ro->hwio", (3, 2, 3, RANK), (RANK, 5))},
    ),
    "conv_3d": Case(
        ConvNet(4, (2, 3, 2), strides=(2, 1, 1), padding="VALID", kernel_dilation=(1, 1, 2)),
        _normal((1, 5, 4, 6, 2)),
        ("conv",),
        {"conv/kernel": ("dhwir,ro->dhwio", (2, 3, 2, 2, RANK), (RANK, 4))},
    ),
    "embed_tied": Case(
        TiedLM(),
        lambda: jnp.asarray(np.random.default_rng(1).integers(0, 20, (2, 6)), jnp.int32),
        ("emb",),
        {"emb/embedding": ("vr,rd->vd", (20, RANK), (RANK, 8))},
    ),
    **{
        f"jnp_{op}": _matmul_case(op)
        for op in ("matmul", "at", "dot", "einsum", "einsum_t", "at_t")
    },
    "bf16_cast": Case(
        Bf16Net(),
        _normal((2, 5, 8), dtype=jnp.bfloat16),
        ("w",),
        {"w": ("ir,ro->io", (8, RANK), (RANK, 6))},
        rel=2e-2,  # bf16 output: ~3 significant digits
        grad_rel=3e-2,
    ),
    "remat_conv1d": Case(
        RematNet(), _normal((2, 5, 8)), ("block/c_fc", "block/c_proj/kernel"), _gpt2_spec("block/")
    ),
}


def _get(tree, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def _nested_copy(tree):
    return {k: _nested_copy(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _put(tree, path: str, value) -> None:
    *head, last = path.split("/")
    for k in head:
        tree = tree[k]
    tree[last] = value


def _np_merge(params, lora, spec, scale):
    """Hand merge in float64 numpy: W + scale * einsum(a, b) in the stored layout."""
    out = _nested_copy(jax.tree.map(np.asarray, params))
    for path, (eq, _, _) in spec.items():
        w, node = _get(params, path), _get(lora, path)
        a, b = np.asarray(node["a"], np.float64), np.asarray(node["b"], np.float64)
        merged = np.asarray(w, np.float64) + scale * np.einsum(eq, a, b)
        _put(out, path, merged.astype(np.asarray(w).dtype))
    return out


def _jnp_merge(params, lora, spec, scale):
    """The same merge in jnp (differentiable): an independent path through the base model."""
    out = _nested_copy(params)
    for path, (eq, _, _) in spec.items():
        w, node = _get(params, path), _get(lora, path)
        _put(out, path, w + scale * jnp.einsum(eq, node["a"], node["b"]))
    return out


def _randomize(lora, seed=7, std=0.3):
    leaves, treedef = jax.tree.flatten(lora)
    return jax.tree.unflatten(
        treedef, [_np_normal(t.shape, seed + i, std, t.dtype) for i, t in enumerate(leaves)]
    )


@dataclasses.dataclass(frozen=True)
class Setup:
    case: Case
    cfg: LoraConfig
    wrapped: jax_lora.LoraWrapped
    x: jax.Array
    params: dict
    lora0: dict  # fresh factors (b == 0)
    lora: dict  # random factors


@functools.cache
def _setup(name: str, dropout: float = 0.0) -> Setup:
    case = CASES[name]
    cfg = LoraConfig(rank=RANK, alpha=ALPHA, targets=case.targets, dropout=dropout)
    wrapped = jax_lora.wrap(case.model, cfg)
    x = case.x()
    shapes = jax.eval_shape(case.model.init, KEY, x)["params"]
    params = _randomize(shapes, seed=100, std=0.5)  # pretrained-like weights, all nonzero
    # jitted: one compile instead of one per eager op (the eager path is tested by the apply
    # checks and test_factor_shapes_wrapped_init)
    lora0 = jax.jit(lambda p, x: jax_lora.init_lora(wrapped, jax.random.key(1), {"params": p}, x))(
        params, x
    )
    return Setup(case, cfg, wrapped, x, params, lora0, _randomize(lora0))


def _expected_shapes(spec):
    out: dict = {}
    for path, (_, a, b) in spec.items():
        node = out
        for k in path.split("/"):
            node = node.setdefault(k, {})
        node.update(a=a, b=b)
    return out


names = pytest.mark.parametrize("name", list(CASES))
jit_or_not = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


def _maybe_jit(f, jit):
    return jax.jit(f) if jit else f


# ---------------------------------------------------------------------------------------------
# The per-case checks


@names
def test_factor_shapes(name):
    s = _setup(name)
    assert jax.tree.map(np.shape, s.lora0) == _expected_shapes(s.case.spec)
    for path in s.case.spec:
        node = _get(s.lora0, path)
        assert node["a"].dtype == node["b"].dtype == jnp.float32
        assert not np.any(np.asarray(node["b"])) and np.all(np.asarray(node["a"]) != 0)


@pytest.mark.parametrize("name", CASES)
def test_factor_shapes_wrapped_init(name):
    """``wrapped.init`` creates params and factors in the same call."""
    s = _setup(name)
    v = s.wrapped.init(KEY, s.x)
    assert jax.tree.map(np.shape, v["lora"]) == _expected_shapes(s.case.spec)
    assert jax.tree.map(np.shape, v["params"]) == jax.tree.map(np.shape, s.params)
    np.testing.assert_array_equal(  # fresh factors change nothing
        np.asarray(s.wrapped.apply(v, s.x)), np.asarray(s.case.model.apply(v, s.x))
    )


@names
@jit_or_not
def test_zero_b_equals_base_bitwise(name, jit):
    s = _setup(name)
    base = _maybe_jit(s.case.model.apply, jit)({"params": s.params}, s.x)
    got = _maybe_jit(s.wrapped.apply, jit)({"params": s.params, "lora": s.lora0}, s.x)
    assert got.dtype == base.dtype and got.shape == base.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))


@names
@jit_or_not
def test_random_factors_equal_hand_merged_model(name, jit):
    s = _setup(name)
    v = {"params": s.params, "lora": s.lora}
    got = _maybe_jit(s.wrapped.apply, jit)(v, s.x)
    merged = _np_merge(s.params, s.lora, s.case.spec, s.cfg.scale)
    want = s.case.model.apply({"params": merged}, s.x)
    base = s.case.model.apply({"params": s.params}, s.x)
    assert got.dtype == base.dtype
    # the update is not negligible: the comparison below can tell LoRA from no LoRA
    assert float(jnp.abs((want - base).astype(jnp.float32)).max()) > 0.05 * float(
        jnp.abs(want.astype(jnp.float32)).max()
    )
    assert_close(got, want, s.case.rel)


@names
def test_disabled_is_base_bitwise(name):
    s = _setup(name)
    v = {"params": s.params, "lora": s.lora}
    base = s.case.model.apply({"params": s.params}, s.x)
    with jax_lora.disabled():
        got = s.wrapped.apply(v, s.x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
    got = s.wrapped.clone(enabled=False).apply(v, s.x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))


@names
def test_merge_and_unmerge_match_numpy(name):
    s = _setup(name)
    v = {"params": s.params, "lora": s.lora}
    merged = jax_lora.merge(v, s.wrapped, s.x)
    want = _np_merge(s.params, s.lora, s.case.spec, s.cfg.scale)
    assert jax.tree.structure(merged) == jax.tree.structure(s.params)
    for path in s.case.spec:
        got_w, want_w = _get(merged, path), _get(want, path)
        assert got_w.dtype == _get(s.params, path).dtype
        assert_close(got_w, want_w, 1e-6)
    restored = jax_lora.unmerge({"params": merged, "lora": s.lora}, s.wrapped, s.x)
    assert_close(restored, s.params, 1e-6)
    # the input is left alone
    jax.tree.map(np.testing.assert_array_equal, v["params"], s.params)


@names
def test_grads_match_merged_model(name):
    s = _setup(name)
    y = s.case.model.apply({"params": s.params}, s.x)
    ct = _np_normal(y.shape, 5, dtype=y.dtype)

    def loss_wrapped(lora):
        out = s.wrapped.apply({"params": s.params, "lora": lora}, s.x)
        return jnp.sum((out * ct).astype(jnp.float32))

    def loss_merged(lora):
        p = _jnp_merge(s.params, lora, s.case.spec, s.cfg.scale)
        return jnp.sum((s.case.model.apply({"params": p}, s.x) * ct).astype(jnp.float32))

    got, want = jax.grad(loss_wrapped)(s.lora), jax.grad(loss_merged)(s.lora)
    for g in jax.tree.leaves(want):
        assert float(jnp.abs(g).max()) > 1e-3  # every factor gets a real gradient
    assert_close(got, want, s.case.grad_rel)


@names
def test_optimizer_leaves_params_bitwise(name):
    s = _setup(name)
    v = {"params": s.params, "lora": s.lora}
    tx = jax_lora.optimizer(optax.adam(1e-2))
    state = tx.init(v)

    @jax.jit
    def step(v, state):
        g = jax.grad(lambda v: jnp.sum(s.wrapped.apply(v, s.x).astype(jnp.float32) ** 2))(v)
        with jax.numpy_dtype_promotion("standard"):  # optax's bias correction: float ** int32
            updates, state = tx.update(g, state, v)
        return optax.apply_updates(v, updates), state

    for _ in range(3):
        v, state = step(v, state)
    jax.tree.map(np.testing.assert_array_equal, v["params"], s.params)
    for new, old in zip(jax.tree.leaves(v["lora"]), jax.tree.leaves(s.lora), strict=True):
        assert float(jnp.abs(new - old).max()) > 1e-3  # adam moved every factor (~3 * lr)


@names
def test_dropout_changes_only_the_branch(name):
    s = _setup(name)
    d = _setup(name, dropout=0.5)
    v, v0 = {"params": s.params, "lora": s.lora}, {"params": s.params, "lora": s.lora0}
    rngs = {"dropout": jax.random.key(9)}
    base = s.case.model.apply({"params": s.params}, s.x)
    no_drop = s.wrapped.apply(v, s.x)
    dropped = d.wrapped.apply(v, s.x, rngs=rngs)
    assert not np.allclose(np.asarray(dropped, np.float32), np.asarray(no_drop, np.float32))
    # b == 0: the branch is zero whatever the dropout mask, and the base path has none
    np.testing.assert_array_equal(np.asarray(d.wrapped.apply(v0, s.x, rngs=rngs)), base)
    # evaluation mode turns it off, even with a dropout rng
    evaluated = d.wrapped.clone(deterministic=True).apply(v, s.x, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(evaluated), np.asarray(no_drop))
    with jax_lora.disabled():
        np.testing.assert_array_equal(np.asarray(d.wrapped.apply(v, s.x, rngs=rngs)), base)


# ---------------------------------------------------------------------------------------------
# Dropout, exactly: with a = b = identity and scale 1 the branch *is* dropout(x)


class OneConv1D(nn.Module):
    features: int = 4
    kernel_init: Callable = nn.initializers.normal(0.5)

    @nn.compact
    def __call__(self, x, deterministic: bool | None = None):
        return Conv1D(self.features, self.kernel_init, name="c")(x)


def test_dropout_drops_the_branch_input_only():
    model, x = OneConv1D(), _np_normal((2, 5, 4), 3)
    cfg = LoraConfig(rank=4, alpha=4.0, targets="c/kernel", dropout=0.5)
    wrapped = jax_lora.wrap(model, cfg)
    params = model.init(KEY, x)["params"]
    eye = jnp.eye(4, dtype=jnp.float32)
    v = {"params": params, "lora": {"c": {"kernel": {"a": eye, "b": eye}}}}
    base = model.apply({"params": params}, x)
    rngs = {"dropout": jax.random.key(3)}
    diff = np.asarray(wrapped.apply(v, x, deterministic=False, rngs=rngs) - base)
    xs = np.asarray(x)
    kept, dropped = np.isclose(diff, 2 * xs, atol=1e-5), np.abs(diff) <= 1e-5
    assert np.all(kept ^ dropped), "each branch input is either dropped or scaled by 1/(1-0.5)"
    assert 0.2 < kept.mean() < 0.8, kept.mean()
    # deterministic=True evaluates (no dropout) even with a dropout rng: branch == x exactly
    no_drop = wrapped.apply(v, x, deterministic=True, rngs=rngs)
    assert_close(no_drop - base, xs, 1e-6)
    rate0 = jax_lora.wrap(model, dataclasses.replace(cfg, dropout=0.0))
    np.testing.assert_array_equal(np.asarray(no_drop), np.asarray(rate0.apply(v, x)))
    with pytest.raises(ValueError, match=r"'c/kernel'.*'dropout' rng"):
        wrapped.apply(v, x, deterministic=False)


# ---------------------------------------------------------------------------------------------
# merge(variables, config): the factors alone must decide the layout


def test_merge_config_square_transposed_kernel_is_ambiguous():
    model, x = OneConv1D(features=8), _np_normal((2, 5, 8), 3)
    cfg = LoraConfig(rank=2, alpha=3.0, targets="c")
    wrapped = jax_lora.wrap(model, cfg)
    params = model.init(KEY, x)["params"]
    lora = _randomize(jax_lora.init_lora(wrapped, KEY, {"params": params}, x))
    v = {"params": params, "lora": lora}
    with pytest.raises(ValueError, match=r"'c/kernel'.*more than one way.*merge\(variables, wrapp"):
        jax_lora.merge(v, cfg)
    spec = {"c/kernel": ("ir,ro->oi", (8, 2), (2, 8))}
    want = _np_merge(params, lora, spec, cfg.scale)
    assert_close(jax_lora.merge(v, wrapped, x), want, 1e-6)  # the model says which way


def test_merge_config_non_square_transposed_kernel():
    model, x = OneConv1D(features=6), _np_normal((2, 5, 8), 3)
    cfg = LoraConfig(rank=2, alpha=3.0, targets="c")
    wrapped = jax_lora.wrap(model, cfg)
    params = model.init(KEY, x)["params"]
    lora = _randomize(jax_lora.init_lora(wrapped, KEY, {"params": params}, x))
    want = _np_merge(params, lora, {"c/kernel": ("ir,ro->oi", (8, 2), (2, 6))}, cfg.scale)
    merged = jax_lora.merge({"params": params, "lora": lora}, cfg)
    assert_close(merged, want, 1e-6)
    assert_close(jax_lora.unmerge({"params": merged, "lora": lora}, cfg), params, 1e-6)


# ---------------------------------------------------------------------------------------------
# Refusals: clear errors that name the weight path and the full class name


class ScaleLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("w", nn.initializers.normal(0.5), x.shape[-2:])


class ElementwiseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv1D(6, name="c")(ScaleLayer(name="scale")(x))


def test_grouped_conv_targeted_by_weight_path_is_refused():
    model, x = ConvNet(4, (3,), groups=2), _np_normal((2, 7, 4), 3)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=1, targets="conv/kernel"))
    with pytest.raises(ValueError) as e:
        wrapped.init(KEY, x)
    msg = str(e.value)
    assert "'conv/kernel'" in msg and "(flax.linen.linear.Conv)" in msg, msg
    assert "feature_group_count=2" in msg, msg


def test_elementwise_weight_targeted_by_weight_path_is_refused():
    x = _np_normal((5, 8), 3)
    wrapped = jax_lora.wrap(ElementwiseNet(), LoraConfig(rank=2, targets="scale/w"))
    with pytest.raises(ValueError) as e:
        wrapped.init(KEY, x)
    msg = str(e.value)
    assert f"'scale/w' ({ScaleLayer.__module__}.ScaleLayer)" in msg, msg
    assert "`mul`" in msg and "not a matmul" in msg, msg


def test_elementwise_weight_with_targets_none_is_skipped_with_a_warning():
    x = _np_normal((5, 8), 3)
    wrapped = jax_lora.wrap(ElementwiseNet(), LoraConfig(rank=2))
    with pytest.warns(UserWarning, match=r"skipped 1 weight.*scale/w \(it goes through `mul`"):
        v = wrapped.init(KEY, x)
    assert jax.tree.map(np.shape, v["lora"]) == {"c": {"kernel": {"a": (8, 2), "b": (2, 6)}}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # apply (not init) warns nothing
        np.testing.assert_array_equal(
            np.asarray(wrapped.apply(v, x)), np.asarray(ElementwiseNet().apply(v, x))
        )


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv1D(6, name="c")(nn.LayerNorm(name="ln")(x))


def test_layernorm_matched_by_module_pattern_is_refused():
    wrapped = jax_lora.wrap(NormNet(), LoraConfig(rank=2, targets=("ln", "c")))
    with pytest.raises(ValueError, match=r"'ln' of type flax\.linen\.normalization\.LayerNorm"):
        wrapped.init(KEY, _np_normal((2, 5, 8), 3))


class OwnsAndCalls(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = x @ self.param("w", nn.initializers.normal(0.5), (8, 6))
        return nn.Dense(4, name="inner")(h)


class OwnsAndCallsNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return OwnsAndCalls(name="mix")(x)


def test_module_owning_a_weight_and_calling_submodules_is_refused():
    wrapped = jax_lora.wrap(OwnsAndCallsNet(), LoraConfig(rank=2, targets="mix/w"))
    with pytest.raises(ValueError, match=r"'mix/w' \(.*OwnsAndCalls\).*calls submodules"):
        wrapped.init(KEY, _np_normal((2, 5, 8), 3))


# ---------------------------------------------------------------------------------------------
# Issue #11 item 4: a small head and targets=None at a rank above its fan-out


class DenseClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="head")(nn.relu(nn.Dense(16, name="hidden")(x)))


class Conv1DClassifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv1D(4, name="head")(nn.relu(Conv1D(16, name="c_fc")(x)))


@pytest.mark.parametrize(
    "model",
    [DenseClassifier(), Conv1DClassifier()],
    ids=["dense", "conv1d"],
)
def test_four_class_head_with_rank_8_does_not_raise(model):
    x = _np_normal((2, 5, 12), 3)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=8))
    params = model.init(KEY, x)["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a skipped head may be reported
        lora = jax_lora.init_lora(wrapped, KEY, {"params": params}, x)
    shapes = jax.tree.map(np.shape, lora)
    hidden = "hidden" if "hidden" in params else "c_fc"
    # the 12 -> 16 layer is adapted at rank 8 (as its own layout), the 16 -> 4 head is not
    got = shapes[hidden] if hidden == "hidden" else shapes[hidden]["kernel"]
    assert got == {"a": (12, 8), "b": (8, 16)}, shapes
    assert "head" not in shapes, shapes
    v = {"params": params, "lora": _randomize(lora)}
    assert wrapped.apply(v, x).shape == (2, 5, 4)


@pytest.mark.parametrize("model", [DenseClassifier(), Conv1DClassifier()], ids=["dense", "conv1d"])
def test_targets_none_leaves_out_the_output_head(model):
    # rank 2 fits the head: it is left out because its output is the model's output
    x = _np_normal((2, 5, 12), 3)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=2))
    params = model.init(KEY, x)["params"]
    lora = jax_lora.init_lora(wrapped, KEY, {"params": params}, x)
    assert "head" not in lora and len(lora) == 1, jax.tree.map(np.shape, lora)
    v = {"params": params, "lora": _randomize(lora)}
    want = np.asarray(wrapped.apply(v, x))
    assert_close(jax.jit(wrapped.apply)(v, x), want, 1e-6)
    assert np.abs(want - np.asarray(model.apply({"params": params}, x))).max() > 1e-3
    with pytest.raises(ValueError, match="no LoRA factors for the layer"):
        wrapped.apply({"params": params, "lora": {}}, x)  # the hidden layer's are missing


# ---------------------------------------------------------------------------------------------
# nn.scan / nn.remat: one adapter per layer, stacked on the layer axis


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(Conv1D(8, name="c")(x)), None


class ScanStack(nn.Module):
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        block = nn.remat(ScanBlock) if self.remat else ScanBlock
        stack = nn.scan(
            block,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            length=3,
        )
        return stack(name="layers")(x, None)[0]


def _scan_setup(remat):
    model, x = ScanStack(remat), _np_normal((2, 5, 8), 3)
    cfg = LoraConfig(rank=2, alpha=3.0, targets="layers/c")
    wrapped = jax_lora.wrap(model, cfg)
    v = wrapped.init(KEY, x)
    return model, x, cfg, wrapped, {"params": v["params"], "lora": _randomize(v["lora"])}


def _np_unrolled(params, lora, x, scale):
    """The scanned stack unrolled in float64 numpy, each layer's kernel merged by hand."""
    h = np.asarray(x, np.float64)
    p, f = params["layers"]["c"], lora["layers"]["c"]["kernel"]
    for layer in range(3):
        a, b = (np.asarray(f[k][layer], np.float64) for k in "ab")
        w = np.asarray(p["kernel"][layer], np.float64) + scale * (a @ b).T  # (out, in)
        h = h + np.tanh(h @ w.T + np.asarray(p["bias"][layer], np.float64))
    return h


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
def test_scan_factors_stack_per_layer_and_match_unrolled(remat):
    _, x, cfg, wrapped, v = _scan_setup(remat)
    want = {"layers": {"c": {"kernel": {"a": (3, 8, 2), "b": (3, 2, 8)}}}}
    assert jax.tree.map(np.shape, v["lora"]) == want
    assert_close(wrapped.apply(v, x), _np_unrolled(v["params"], v["lora"], x, cfg.scale), 1e-5)
    assert_close(jax.jit(wrapped.apply)(v, x), wrapped.apply(v, x), 1e-6)


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
def test_scan_merge_matches_unrolled(remat):
    model, x, cfg, wrapped, v = _scan_setup(remat)
    merged = jax_lora.merge(v, wrapped, x)
    want = np.asarray(v["params"]["layers"]["c"]["kernel"], np.float64) + cfg.scale * np.einsum(
        "lir,lro->loi",
        *(np.asarray(v["lora"]["layers"]["c"]["kernel"][k], np.float64) for k in "ab"),
    )
    assert_close(merged["layers"]["c"]["kernel"], want, 1e-6)
    assert_close(model.apply({"params": merged}, x), wrapped.apply(v, x), 1e-5)


# ---------------------------------------------------------------------------------------------
# Partitioning metadata follows the axis roles


def test_partitioned_transposed_kernel_gives_partitioned_factors():
    init = nn.with_partitioning(nn.initializers.normal(0.5), ("mlp", "embed"))  # (out, in)
    model, x = OneConv1D(features=6, kernel_init=init), _np_normal((2, 5, 8), 3)
    v = jax_lora.wrap(model, LoraConfig(rank=2, targets="c")).init(KEY, x)
    a, b = v["lora"]["c"]["kernel"]["a"], v["lora"]["c"]["kernel"]["b"]
    assert isinstance(a, nn.Partitioned) and isinstance(b, nn.Partitioned)
    assert a.names == ("embed", None) and a.value.shape == (8, 2)
    assert b.names == (None, "mlp") and b.value.shape == (2, 6)
    assert v["params"]["c"]["kernel"].names == ("mlp", "embed")


class PrefixNames(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv1D(8, name="fc_out")(jax.nn.gelu(Conv1D(12, name="fc")(x)))


@pytest.mark.parametrize("targets", ["fc", "fc/kernel", "f./kernel", r"fc(/\w+)?"])
def test_pattern_does_not_reach_a_longer_name(targets):
    """``fc`` must not adapt ``fc_out`` (re.fullmatch, not re.search)."""
    model, x = PrefixNames(), _np_normal((2, 5, 8), 3)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=2, targets=targets))
    lora = jax_lora.init_lora(wrapped, KEY, {"params": model.init(KEY, x)["params"]}, x)
    assert jax.tree.map(np.shape, lora) == {"fc": {"kernel": {"a": (8, 2), "b": (2, 12)}}}


def test_patterns_fully_match_module_or_weight_paths():
    model, x = GPT2MLP(), _np_normal((2, 5, 8), 3)
    params = model.init(KEY, x)["params"]
    for targets in ("c_fc", "c_fc/kernel", r"c_f./.*"):
        wrapped = jax_lora.wrap(model, LoraConfig(rank=2, targets=targets))
        lora = jax_lora.init_lora(wrapped, KEY, {"params": params}, x)
        assert jax.tree.map(np.shape, lora) == {"c_fc": {"kernel": {"a": (8, 2), "b": (2, 12)}}}
    for partial in ("c_", "kernel", "fc/kernel", "c_fc/kern"):  # substrings match nothing
        wrapped = jax_lora.wrap(model, LoraConfig(rank=2, targets=partial))
        with pytest.raises(ValueError):
            jax_lora.init_lora(wrapped, KEY, {"params": params}, x)


def test_unmatched_pattern_error_names_pattern_and_weight_paths():
    model, x = GPT2MLP(), _np_normal((2, 5, 8), 3)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=2, targets="c_"))
    with pytest.raises(ValueError, match=r"(?s)pattern 'c_' matches no.*c_fc/kernel"):
        wrapped.init(KEY, x)


def test_gpt2_conv1d_branch_is_2d_matmuls():
    """The any-weight branch (GPT-2 Conv1D, x: (3, 5, 8)) and its gradients are 2-D matmuls over
    flattened tokens: XLA:CPU runs `x.T @ dh` over a 3-D `x` several times slower."""
    model, x = GPT2MLP(), _np_normal((3, 5, 8), 3)
    params = model.init(KEY, x)["params"]
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4, targets=("c_fc", "c_proj")))
    lora = _randomize(jax_lora.init_lora(wrapped, KEY, {"params": params}, x))

    def loss(lora):
        return (wrapped.apply({"params": params, "lora": lora}, x) ** 2).sum()

    eqns = jax.make_jaxpr(jax.grad(loss))(lora).jaxpr.eqns
    shapes = [[v.aval.shape for v in e.invars] for e in eqns if e.primitive.name == "dot_general"]
    branch = [s for s in shapes if any(4 in shape for shape in s)]  # rank 4: only the branch
    assert len(branch) == 11, shapes  # 2 forward + 3 backward (dh, da, db) per layer, + c_proj dx
    assert all(len(shape) == 2 for s in branch for shape in s), branch
