"""NNX LoRA on any weight: custom layers (GPT-2 Conv1D-like, gemma-style einsum), nnx.Conv and
nnx.Embed (``__call__`` and ``attend``), checked against hand-merged weights computed in numpy."""

import pickle
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import LoraConfig

V, D, N, H = 11, 8, 2, 4  # vocab, model width, heads, head width


class Conv1D(nnx.Module):
    """GPT-2 style projection storing its kernel (out, in): ``x @ kernel.T + bias``."""

    def __init__(self, n_in: int, n_out: int, rngs: nnx.Rngs):
        self.kernel = nnx.Param(0.3 * jax.random.normal(rngs.params(), (n_out, n_in)))
        self.bias = nnx.Param(0.1 * jax.random.normal(rngs.params(), (n_out,)))

    def __call__(self, x):
        y = x @ self.kernel[...].T
        return y + self.bias[...].reshape((1,) * (y.ndim - 1) + (-1,))


class Heads(nnx.Module):
    """gemma-style einsum: ``w (N, D, H)``, ``'BTD,NDH->BTNH'``."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), (N, 3 * D // 2, H)))

    def __call__(self, x):
        return jnp.einsum("BTD,NDH->BTNH", x, self.w[...])


class Tiny(nnx.Module):
    """ids (B, T) -> embed (B, T, D) -> Conv1D (B, T, 12) -> heads (B, T, N, H) -> attend."""

    def __init__(self, rngs: nnx.Rngs):
        self.emb = nnx.Embed(V, D, rngs=rngs)
        self.c_attn = Conv1D(D, 3 * D // 2, rngs)
        self.heads = Heads(rngs)

    def __call__(self, ids):
        h = self.heads(self.c_attn(self.emb(ids)))
        return self.emb.attend(h.reshape(h.shape[:2] + (N * H,)))


class Gate(nnx.Module):
    """A weight used as a matmul operand *and* summed: LoRA cannot follow the sum."""

    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

    def __call__(self, x):
        return x @ self.w[...] + jnp.sum(self.w[...])


IDS = jnp.array([[1, 4, 9, 0], [3, 3, 10, 7]])
TARGETS = ["emb/embedding", "c_attn", "heads/w"]
CFG = LoraConfig(rank=2, alpha=6.0, targets=TARGETS)  # scale 3


def _tiny(cfg=CFG, **kw):
    return jax_lora.wrap(Tiny(nnx.Rngs(0)), cfg, example=(IDS,), **kw)


def _random_factors(model, seed=5):
    lora = jax_lora.lora_state(model)
    keys = iter(jax.random.split(jax.random.key(seed), 16))
    lora = jax.tree.map(lambda t: 0.3 * jax.random.normal(next(keys), t.shape), lora)
    jax_lora.load_lora(model, lora)
    return jax.tree.map(np.asarray, lora)


def _hand_merged(lora, scale=3.0):
    """A plain Tiny whose weights are W + scale * a @ b, put in the stored layout by numpy."""
    base = Tiny(nnx.Rngs(0))
    e, k, w = (
        np.asarray(v[...], np.float64)
        for v in (base.emb.embedding, base.c_attn.kernel, base.heads.w)
    )
    le, lk, lw = lora["emb"]["embedding"], lora["c_attn"]["kernel"], lora["heads"]["w"]
    base.emb.embedding[...] = jnp.asarray(e + scale * le["a"] @ le["b"], jnp.float32)  # (V, D)
    base.c_attn.kernel[...] = jnp.asarray(
        k + scale * (lk["a"] @ lk["b"]).T, jnp.float32
    )  # (out, in)
    dw = np.einsum("dr,rnh->ndh", lw["a"].astype(np.float64), lw["b"].astype(np.float64))
    base.heads.w[...] = jnp.asarray(w + scale * dw, jnp.float32)  # (N, D, H)
    return base


def test_factor_layout_and_zero_b_is_exact():
    plain = Tiny(nnx.Rngs(0))
    model = _tiny()
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(model)) == {
        "emb": {"embedding": {"a": (V, 2), "b": (2, D)}},
        "c_attn": {"kernel": {"a": (D, 2), "b": (2, 12)}},  # stored (12, 8): in is axis 1
        "heads": {"w": {"a": (12, 2), "b": (2, N, H)}},  # stored (N, D, H): N is an output
    }
    assert type(model.emb) is jax_lora.nnx.LoraEmbed
    assert isinstance(model.c_attn, Conv1D) and jax_lora.nnx.is_adapted(model.c_attn)
    with warnings.catch_warnings():  # the lifted trace keeps its debug info (jax deprecation)
        warnings.simplefilter("error", DeprecationWarning)
        y = model(IDS)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(plain(IDS)))


@pytest.mark.parametrize("jit", [False, True])
def test_random_factors_equal_hand_merged_weights(jit):
    model = _tiny()
    merged = _hand_merged(_random_factors(model))
    run = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    got, want = run(model, IDS), merged(IDS)
    assert_close(got, want, 1e-5)
    assert np.abs(np.asarray(got - Tiny(nnx.Rngs(0))(IDS))).max() > 0.1  # the branch matters
    # attend alone, on its own query
    q = jax.random.normal(jax.random.key(9), (3, D))
    attend = nnx.jit(lambda e, q: e.attend(q)) if jit else (lambda e, q: e.attend(q))
    assert_close(attend(model.emb, q), merged.emb.attend(q), 1e-5)


def test_conv2d():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    conv = nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0))
    plain = nnx.clone(conv)
    jax_lora.wrap(conv, LoraConfig(rank=2, alpha=4.0, targets=["kernel"]))  # no example needed
    assert type(conv) is jax_lora.nnx.LoraConv
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(conv)) == {
        "kernel": {"a": (3, 3, 3, 2), "b": (2, 5)}
    }
    np.testing.assert_array_equal(np.asarray(conv(x)), np.asarray(plain(x)))
    lora = _random_factors(conv)["kernel"]
    k = np.asarray(plain.kernel[...], np.float64)
    plain.kernel[...] = jnp.asarray(
        k + 2.0 * np.einsum("hwir,ro->hwio", lora["a"], lora["b"]), jnp.float32
    )
    assert_close(conv(x), plain(x), 1e-5)
    assert np.abs(np.asarray(conv(x) - nnx.Conv(3, 5, (3, 3), rngs=nnx.Rngs(0))(x))).max() > 0.1


def test_grouped_conv_refused_and_model_untouched():
    conv = nnx.Conv(4, 4, (3,), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"'kernel' \(flax\.nnx\.nn\.linear\.Conv\).*feature_group_count=2"
    ):
        jax_lora.wrap(conv, LoraConfig(rank=2, targets=[".*"]))
    assert type(conv) is nnx.Conv and not any(
        k.startswith(("lora", "kernel_lora")) for k in vars(conv)
    )


def test_missing_example_refused():
    model = Tiny(nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"'c_attn/kernel' of (tests\.)?test_nnx_weights\.Conv1D.*example="
    ):
        jax_lora.wrap(model, CFG)
    assert type(model.emb) is nnx.Embed and type(model.c_attn) is Conv1D  # nothing changed
    assert jax_lora.lora_state(model) == {}


def test_weight_used_otherwise():
    class M(nnx.Module):
        def __init__(self, rngs):
            self.gate, self.fc = Gate(rngs), Conv1D(D, D, rngs)

        def __call__(self, x):
            return self.fc(self.gate(x))

    x = jnp.ones((2, D))
    with pytest.raises(
        ValueError, match=r"'gate/w' \((tests\.)?test_nnx_weights\.Gate\).*reduce_sum"
    ):
        jax_lora.wrap(M(nnx.Rngs(0)), LoraConfig(rank=2, targets=["gate/w"]), example=(x,))
    # matched through the module path only: skipped, and the pattern then matches nothing
    with pytest.raises(ValueError, match=r"(?s)'gate'.*matches no.*gate/w: it goes through"):
        jax_lora.wrap(M(nnx.Rngs(0)), LoraConfig(rank=2, targets=["gate", "fc"]), example=(x,))
    # targets=None: skipped with a warning, the Conv1D-like layer adapted
    with pytest.warns(UserWarning, match="gate/w"):
        m = jax_lora.wrap(M(nnx.Rngs(0)), LoraConfig(rank=2), example=(x,))
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(m)) == {
        "fc": {"kernel": {"a": (D, 2), "b": (2, D)}}
    }


def test_all_linear_needs_example_and_never_takes_conv_or_embed():
    model = _tiny(LoraConfig(rank=2))
    assert set(jax_lora.lora_state(model)) == {"c_attn", "heads"}  # no emb: name it in targets
    with pytest.raises(ValueError, match="no layer LoRA can adapt"):
        jax_lora.wrap(Tiny(nnx.Rngs(0)), LoraConfig(rank=2))  # no example: custom weights skipped


class LinenConv1D(nn.Module):
    """`Conv1D` in linen."""

    n_out: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(0.3), (self.n_out, x.shape[-1]))
        b = self.param("bias", nn.initializers.zeros, (self.n_out,))
        y = x @ k.T
        return y + b.reshape((1,) * (y.ndim - 1) + (-1,))


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return LinenConv1D(4, name="c_proj")(nn.relu(LinenConv1D(12, name="c_attn")(x)))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.c_attn, self.c_proj = Conv1D(D, 12, rngs), Conv1D(12, 4, rngs)

    def __call__(self, x):
        return self.c_proj(nnx.relu(self.c_attn(x)))


def test_nnx_equals_linen_on_the_same_weights():
    cfg = LoraConfig(rank=2, alpha=4.0, targets=["c_.*/kernel"])
    x = jax.random.normal(jax.random.key(1), (3, D))
    wrapped = jax_lora.wrap(LinenBlock(), cfg)
    v = wrapped.init(jax.random.key(0), x)
    v["lora"] = jax.tree.map(
        lambda t: 0.3 * jax.random.normal(jax.random.key(t.size), t.shape), v["lora"]
    )
    model = jax_lora.wrap(Block(nnx.Rngs(0)), cfg, example=(x,))
    for name in ("c_attn", "c_proj"):
        getattr(model, name).kernel[...] = v["params"][name]["kernel"]
        getattr(model, name).bias[...] = v["params"][name]["bias"]
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(model)) == jax.tree.map(jnp.shape, v["lora"])
    jax_lora.load_lora(model, v["lora"])
    assert_close(model(x), wrapped.apply(v, x), 1e-6)
    merged = jax_lora.merge(model)
    linen_merged = jax_lora.merge(v, wrapped, x)
    for name in ("c_attn", "c_proj"):
        assert_close(getattr(merged, name).kernel[...], linen_merged[name]["kernel"], 1e-6)


def test_gradients_and_optimizer_reach_only_the_factors():
    with jax.numpy_dtype_promotion("standard"):  # optax internals
        model = _tiny()
        _random_factors(model)
        y = jax.random.normal(jax.random.key(3), (2, 4, V))
        base = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
        loss_fn = lambda m: jnp.mean((m(IDS) - y) ** 2)  # noqa: E731

        @nnx.jit
        def step(model, opt):
            loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
            opt.update(model, g)
            return loss, g

        _, g = step(model, opt)
        paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(g)[0]}
        assert paths == {
            f"['{m}']['{w}_lora_{f}'].value"
            for m, w in (("emb", "embedding"), ("c_attn", "kernel"), ("heads", "w"))
            for f in "ab"
        }
        # the gradient of b equals the gradient through the hand-merged weights
        lora = jax.tree.map(np.asarray, jax_lora.lora_state(model))
        k0 = Tiny(nnx.Rngs(0)).c_attn.kernel[...]

        def merged_loss(b):  # through c_attn's b only: W + 3 * (a @ b).T, stored (out, in)
            m = _hand_merged(lora)
            m.c_attn.kernel[...] = k0 + 3.0 * (lora["c_attn"]["kernel"]["a"] @ b).T
            return loss_fn(m)

        want = jax.grad(merged_loss)(jnp.asarray(lora["c_attn"]["kernel"]["b"]))
        _, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        assert_close(g["c_attn"]["kernel_lora_b"][...], want, 1e-4)
        losses = [float(step(model, opt)[0]) for _ in range(20)]
        assert losses[-1] < 0.8 * losses[0]
        jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.LoRAParam)), base)
    rep = jax_lora.param_report(model)
    n_lora = V * 2 + 2 * D + D * 2 + 2 * 12 + 12 * 2 + 2 * N * H
    assert rep.trainable == n_lora and rep.total == V * D + 12 * D + 12 + N * 12 * H + n_lora


def test_merge_unmerge_round_trip():
    model = _tiny()
    lora = _random_factors(model)
    merged = jax_lora.merge(model)
    plain = Tiny(nnx.Rngs(0))
    for got, want in zip(
        jax.tree.leaves(nnx.state(merged)),
        jax.tree.leaves(nnx.state(_hand_merged(lora))),
        strict=True,
    ):
        assert_close(got, want, 1e-6)
    assert type(merged.emb) is nnx.Embed and type(merged.c_attn) is Conv1D
    assert set(vars(merged.c_attn)) == set(vars(plain.c_attn))
    assert_close(merged(IDS), model(IDS), 1e-5)
    back = jax_lora.unmerge(merged, model)
    for got, want in zip(
        jax.tree.leaves(nnx.state(back)), jax.tree.leaves(nnx.state(plain)), strict=True
    ):
        assert_close(got, want, 1e-6)


def test_pickle_split_merge_and_switches():
    model = _tiny(LoraConfig(rank=2, alpha=6.0, targets=TARGETS, dropout=0.5))
    _random_factors(model)
    model.eval()
    want = np.asarray(model(IDS))
    back = pickle.loads(pickle.dumps(model))
    assert type(back.c_attn) is type(model.c_attn) and type(back.emb) is jax_lora.nnx.LoraEmbed
    np.testing.assert_array_equal(np.asarray(back(IDS)), want)
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(
        np.asarray(nnx.merge(pickle.loads(pickle.dumps(graphdef)), state)(IDS)), want
    )
    # dropout: eval equals the hand-merged model; training draws fresh masks on c_attn / heads
    assert_close(want, _hand_merged(jax_lora.lora_state(model))(IDS), 1e-5)
    model.train()
    y1, y2 = np.asarray(model(IDS)), np.asarray(model(IDS))
    assert np.abs(y1 - want).max() > 1e-3 and np.abs(y1 - y2).max() > 1e-3
    model.eval()
    plain = np.asarray(Tiny(nnx.Rngs(0))(IDS))
    with jax_lora.disabled():
        np.testing.assert_array_equal(np.asarray(model(IDS)), plain)
    jax_lora.set_enabled(model, False)
    np.testing.assert_array_equal(np.asarray(model(IDS)), plain)
