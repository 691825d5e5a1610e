"""`jax_lora.wrap` against independent computations: the base model with W + scale * A @ B."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from _models import MLP, Encoder

import jax_lora
from jax_lora import LoraConfig

KEY = jax.random.key(0)


def _x(shape=(2, 5, 16), seed=1, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _randomize(lora, seed=7, std=0.3):
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [std * jax.random.normal(k, t.shape, t.dtype) for k, t in zip(keys, leaves, strict=True)],
    )


def _manual_merge(params, lora, scale):
    """W + scale * a @ b with numpy, independent of jax_lora.merge."""
    out = jax.tree.map(np.asarray, params)

    def visit(p, node):
        if "a" in node:
            a, b = np.asarray(node["a"], np.float64), np.asarray(node["b"], np.float64)
            delta = np.tensordot(a, b, axes=([a.ndim - 1], [0]))
            p["kernel"] = (p["kernel"].astype(np.float64) + scale * delta).astype(np.float32)
            return
        for k in node:
            visit(p[k], node[k])

    visit(out, lora)
    return out


jit_or_not = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])


@jit_or_not
@pytest.mark.parametrize("model, x", [(MLP(), _x((4, 16))), (Encoder(), _x())])
def test_at_init_equals_base_bitwise(model, x, jit):
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4, alpha=8))
    v = wrapped.init(KEY, x)
    base_params = model.init(KEY, x)["params"]
    # params is exactly the base tree (same structure, shapes and, with the same key, values)
    assert jax.tree.structure(v["params"]) == jax.tree.structure(base_params)
    jax.tree.map(lambda p, q: np.testing.assert_array_equal(p, q), v["params"], base_params)
    # compare like with like: XLA may fuse a jitted graph differently from eager ops
    apply, base_apply = (
        (jax.jit(wrapped.apply), jax.jit(model.apply)) if jit else (wrapped.apply, model.apply)
    )
    base = base_apply({"params": v["params"]}, x)
    np.testing.assert_array_equal(np.asarray(apply(v, x)), np.asarray(base))


def test_lora_tree_spec():
    x = _x()
    v = jax_lora.wrap(Encoder(layers=1), LoraConfig(rank=4)).init(KEY, x)
    shapes = jax.tree.map(jnp.shape, v["lora"])
    qkv = {"a": (16, 4), "b": (4, 2, 8)}  # DenseGeneral kernel (16, heads=2, 8)
    assert shapes == {
        "layer_0": {
            "attn": {"query": qkv, "key": qkv, "value": qkv, "out": {"a": (2, 8, 4), "b": (4, 16)}},
            "up": {"a": (16, 4), "b": (4, 2, 16)},
            "down": {"a": (2, 16, 4), "b": (4, 16)},
        },
    }  # no "head": targets=None leaves out the output head, as PEFT's "all-linear"
    assert all(t.dtype == jnp.float32 for t in jax.tree.leaves(v["lora"]))
    with_head = jax_lora.wrap(Encoder(layers=1), LoraConfig(rank=4, targets=[".*/attn/.*", "head"]))
    assert jax.tree.map(jnp.shape, with_head.init(KEY, x)["lora"]["head"]) == {
        "a": (16, 4),
        "b": (4, 8),
    }


@jit_or_not
@pytest.mark.parametrize("model, x", [(MLP(), _x((4, 16))), (Encoder(), _x())])
@pytest.mark.parametrize("rslora", [False, True])
def test_random_factors_equal_merged_kernel(model, x, jit, rslora):
    cfg = LoraConfig(rank=4, alpha=6, rslora=rslora)
    wrapped = jax_lora.wrap(model, cfg)
    v = wrapped.init(KEY, x)
    v["lora"] = _randomize(v["lora"])
    apply = jax.jit(wrapped.apply) if jit else wrapped.apply
    got = np.asarray(apply(v, x))
    want = np.asarray(model.apply({"params": _manual_merge(v["params"], v["lora"], cfg.scale)}, x))
    base = np.asarray(model.apply({"params": v["params"]}, x))
    assert np.abs(want - base).max() > 0.1  # the update is not a no-op
    assert_close(got, want, 1e-5)


def test_targets_and_exclude_select_paths():
    cfg = LoraConfig(rank=2, targets=r".*/attn/(query|value)", exclude=r"layer_1/.*")
    v = jax_lora.wrap(Encoder(), cfg).init(KEY, _x())
    assert jax.tree.map(jnp.shape, v["lora"]) == {
        "layer_0": {
            "attn": {
                "query": {"a": (16, 2), "b": (2, 2, 8)},
                "value": {"a": (16, 2), "b": (2, 2, 8)},
            }
        }
    }


@pytest.fixture
def standard_promotion():
    """optax's Adam raises an int step count to a float power: not strict-promotion clean."""
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_grads_only_for_factors_and_50_adam_steps_keep_base_bitwise(standard_promotion):
    x, y = _x((32, 16)), jax.random.normal(jax.random.key(2), (32, 4))
    model = MLP()
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4))
    v = wrapped.init(KEY, x)
    v["lora"] = _randomize(v["lora"], std=0.1)
    tx = jax_lora.optimizer(optax.adam(1e-2))
    state = tx.init(v)
    # Adam state: exactly mu and nu for each factor, nothing for the frozen params.
    n_lora = sum(t.size for t in jax.tree.leaves(v["lora"]))
    float_state = [t for t in jax.tree.leaves(state) if jnp.issubdtype(t.dtype, jnp.floating)]
    assert sum(t.size for t in float_state) == 2 * n_lora

    def loss(v):
        return jnp.mean((wrapped.apply(v, x) - y) ** 2)

    grads = jax.grad(loss)(v)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["lora"]))
    updates, _ = tx.update(grads, state, v)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(updates["params"]))

    @jax.jit
    def step(v, state):
        loss_value, g = jax.value_and_grad(loss)(v)
        u, state = tx.update(g, state, v)
        return optax.apply_updates(v, u), state, loss_value

    v0 = v
    losses = []
    for _ in range(50):
        v, state, loss_value = step(v, state)
        losses.append(float(loss_value))
    jax.tree.map(lambda p, q: np.testing.assert_array_equal(p, q), v["params"], v0["params"])
    assert losses[-1] < 0.7 * losses[0]
    assert all(
        np.abs(p - q).max() > 0
        for p, q in zip(jax.tree.leaves(v["lora"]), jax.tree.leaves(v0["lora"]), strict=True)
    )


def test_fast_path_grad_of_lora_only_equals_full_grad():
    x = _x()
    wrapped = jax_lora.wrap(Encoder(), LoraConfig(rank=2))
    v = wrapped.init(KEY, x)
    v["lora"] = _randomize(v["lora"])

    def loss(lora, params):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, x) ** 2)

    g_fast = jax.jit(jax.grad(loss))(v["lora"], v["params"])
    g_full = jax.grad(lambda v: loss(v["lora"], v["params"]))(v)["lora"]
    assert_close(g_fast, g_full, 1e-5)


def test_grad_matches_finite_difference_of_independent_model():
    """d loss / d b through wrap == d loss / d b of the base model with W + scale * a @ b."""
    x = _x((4, 16))
    cfg = LoraConfig(rank=3, alpha=5, targets="fc1|fc2|head")
    model = MLP()
    wrapped = jax_lora.wrap(model, cfg)
    v = wrapped.init(KEY, x)
    v["lora"] = _randomize(v["lora"])

    def via_kernel(lora):
        params = jax.tree.map(lambda t: t, v["params"])
        for name in ("fc1", "fc2", "head"):
            a, b = lora[name]["a"], lora[name]["b"]
            params[name] = dict(params[name], kernel=params[name]["kernel"] + cfg.scale * a @ b)
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    g_ref = jax.grad(via_kernel)(v["lora"])
    g = jax.grad(
        lambda lora: jnp.sum(wrapped.apply({"params": v["params"], "lora": lora}, x) ** 2)
    )(v["lora"])
    assert_close(g, g_ref, 1e-5)

    # central differences in float64: (L(t + eps) - L(t - eps)) / (2 eps), error O(eps^2)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda u: jnp.asarray(u, jnp.float64), t)  # noqa: E731
        params, lora, x64 = f64(v["params"]), f64(v["lora"]), f64(x)

        def loss(lora):
            return jnp.sum(wrapped.apply({"params": params, "lora": lora}, x64) ** 2)

        loss = jax.jit(loss)

        g64, eps = jax.grad(loss)(lora), 1e-6
        for name in ("fc1", "fc2", "head"):
            for f in ("a", "b"):
                t = lora[name][f]
                for idx in [(0, 0), (t.shape[0] - 1, t.shape[1] - 1), (1, 1)]:
                    bump = lambda d: {  # noqa: E731
                        **lora,
                        name: {**lora[name], f: t.at[idx].add(d)},  # noqa: B023
                    }
                    fd = (loss(bump(eps)) - loss(bump(-eps))) / (2 * eps)
                    want = float(g64[name][f][idx])
                    assert abs(float(fd) - want) <= 1e-6 * max(1.0, abs(want)), (name, f, idx)


def test_dropout_is_inverted_and_only_with_rng():
    n, p = 4000, 0.25
    cfg = LoraConfig(rank=1, dropout=p)
    model = nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)
    wrapped = jax_lora.wrap(model, cfg)
    x = jnp.ones((1, n))
    v = wrapped.init(KEY, x)
    v["lora"] = {"a": jnp.ones((n, 1)), "b": jnp.ones((1, 1))}
    # no dropout rng (eval): the plain branch, sum(x) = n
    assert float(wrapped.apply(v, x)[0, 0]) == n
    y1 = wrapped.apply(v, x, rngs={"dropout": jax.random.key(3)})
    y2 = wrapped.apply(v, x, rngs={"dropout": jax.random.key(3)})
    y3 = wrapped.apply(v, x, rngs={"dropout": jax.random.key(4)})
    assert float(y1[0, 0]) == float(y2[0, 0]) != float(y3[0, 0])
    kept = float(y1[0, 0]) * (1 - p)  # inverted dropout: each kept unit counts 1 / (1 - p)
    assert abs(kept - round(kept)) < 1e-2
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(kept - n * (1 - p)) < 4 * sigma
    det = wrapped.clone(deterministic=True)
    assert float(det.apply(v, x, rngs={"dropout": jax.random.key(3)})[0, 0]) == n


class _ModeNet(nn.Module):
    """One zero-kernel Dense(1) that takes the usual train/eval keywords (and ignores them)."""

    @nn.compact
    def __call__(self, x, deterministic=None, train=None):
        return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros)(x)


def _assert_valid_dropout(y, n: int, p: float) -> None:
    """``y`` = sum of an inverted-dropout mask over ``n`` ones (a = b = ones, zero kernel)."""
    kept = float(y) * (1 - p)
    assert abs(kept - round(kept)) < 1e-2, kept  # each kept unit counts 1 / (1 - p)
    assert round(kept) != n  # something was dropped (P(nothing dropped) = 0.75**4000)
    assert abs(kept - n * (1 - p)) < 4 * np.sqrt(n * p * (1 - p))


# (call keywords, LoraWrapped.deterministic) -> training mode, or None: follow the rng
_CALL_FLAGS = {
    "none": ({}, None),
    "det=True": ({"deterministic": True}, False),
    "det=False": ({"deterministic": False}, True),
    "train=True": ({"train": True}, True),
    "train=False": ({"train": False}, False),
}


@pytest.mark.parametrize("flag", list(_CALL_FLAGS))
@pytest.mark.parametrize("attr", [None, True, False])
@pytest.mark.parametrize("rng", [False, True])
def test_dropout_follows_train_eval_mode(flag, attr, rng):
    """Call keyword wins, then `LoraWrapped.deterministic`, then "a dropout rng was given"."""
    n, p = 4000, 0.25
    kwargs, call_training = _CALL_FLAGS[flag]
    wrapped = jax_lora.wrap(_ModeNet(), LoraConfig(rank=1, dropout=p)).clone(deterministic=attr)
    x = jnp.ones((1, n))
    v = wrapped.init(KEY, x)
    v["lora"] = {"Dense_0": {"a": jnp.ones((n, 1)), "b": jnp.ones((1, 1))}}
    training = (
        call_training if call_training is not None else (not attr if attr is not None else rng)
    )
    rngs = {"dropout": jax.random.key(3)} if rng else {}
    if training and not rng:
        with pytest.raises(ValueError, match="'Dense_0'.*no 'dropout' rng"):
            wrapped.apply(v, x, rngs=rngs, **kwargs)
        return
    y = wrapped.apply(v, x, rngs=rngs, **kwargs)[0, 0]
    if training:
        _assert_valid_dropout(y, n, p)
        y2 = wrapped.apply(v, x, rngs={"dropout": jax.random.key(4)}, **kwargs)[0, 0]
        assert float(y2) != float(y)
    else:
        assert float(y) == n  # exactly the branch without dropout: sum(x) = n


def test_disabled_and_enabled_false_give_base_exactly():
    x = _x()
    model = Encoder()
    wrapped = jax_lora.wrap(model, LoraConfig(rank=2))
    v = wrapped.init(KEY, x)
    v["lora"] = _randomize(v["lora"])
    base = np.asarray(model.apply({"params": v["params"]}, x))
    base_jit = np.asarray(jax.jit(model.apply)({"params": v["params"]}, x))
    with jax_lora.disabled():
        np.testing.assert_array_equal(np.asarray(wrapped.apply(v, x)), base)
        np.testing.assert_array_equal(np.asarray(jax.jit(wrapped.apply)(v, x)), base_jit)
    off = wrapped.clone(enabled=False)
    np.testing.assert_array_equal(np.asarray(jax.jit(off.apply)(v, x)), base_jit)
    # and LoRA is back on outside the context
    assert np.abs(np.asarray(wrapped.apply(v, x)) - base).max() > 0.1
    # "remove": `params` is exactly the base model's tree, so the plain module runs on it
    assert jax.tree.structure(v["params"]) == jax.tree.structure(model.init(KEY, x)["params"])


def test_remat_equals_plain():
    x = _x()
    cfg = LoraConfig(rank=2)
    plain, remat = jax_lora.wrap(Encoder(), cfg), jax_lora.wrap(Encoder(remat=True), cfg)
    v = plain.init(KEY, x)
    assert jax.tree.structure(remat.init(KEY, x)) == jax.tree.structure(v)
    v["lora"] = _randomize(v["lora"])

    def loss(m):
        return lambda lora: jnp.sum(m.apply({"params": v["params"], "lora": lora}, x) ** 2)

    assert_close(remat.apply(v, x), plain.apply(v, x), 1e-6)
    g1, g2 = jax.jit(jax.grad(loss(plain)))(v["lora"]), jax.jit(jax.grad(loss(remat)))(v["lora"])
    assert_close(g1, g2, 1e-5)


def test_wrapped_as_submodule_of_a_bigger_model():
    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            enc = jax_lora.wrap(MLP(out=8), LoraConfig(rank=2, targets=r"enc/fc1"), name="enc")
            return nn.Dense(2, name="top")(enc(x))

    x = _x((3, 16))
    v = Outer().init(KEY, x)
    assert jax.tree.map(jnp.shape, v["lora"]) == {"enc": {"fc1": {"a": (16, 2), "b": (2, 16)}}}
    assert set(v["params"]) == {"enc", "top"} and set(v["params"]["enc"]) == {"fc1", "fc2", "head"}
    v["lora"] = _randomize(v["lora"])
    assert_close(
        Outer().apply(v, x),
        nn.Dense(2).apply(
            {"params": v["params"]["top"]},
            MLP(out=8).apply(
                {"params": _manual_merge(v["params"]["enc"], v["lora"]["enc"], 1.0)}, x
            ),
        ),
        1e-5,
    )


@pytest.mark.parametrize("model_name", ["mlp", "encoder"])
def test_mixed_precision_bf16_base_fp32_factors(model_name):
    if model_name == "encoder":
        # flax's LayerNorm itself promotes bf16 with f32; our code passes strict mode (mlp).
        with jax.numpy_dtype_promotion("standard"):
            _mixed_precision(Encoder, (2, 5, 16))
    else:
        _mixed_precision(MLP, (4, 16))


def _mixed_precision(cls, shape):
    x = _x(shape, dtype=jnp.bfloat16)
    model = cls(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    cfg = LoraConfig(rank=4)
    wrapped = jax_lora.wrap(model, cfg)
    # jitted: the dtypes are the traced program's either way, and op-by-op the encoder's
    # forward and grad took ~20 s of CPU
    v = jax.jit(wrapped.init)(KEY, x)
    assert all(t.dtype == jnp.bfloat16 for t in jax.tree.leaves(v["params"]))
    assert all(t.dtype == jnp.float32 for t in jax.tree.leaves(v["lora"]))
    v["lora"] = _randomize(v["lora"])
    y = jax.jit(wrapped.apply)(v, x)
    assert y.dtype == jnp.bfloat16
    g = jax.jit(
        jax.grad(
            lambda lora: jnp.sum(
                wrapped.apply({"params": v["params"], "lora": lora}, x).astype(jnp.float32)
            )
        )
    )(v["lora"])
    assert all(
        t.dtype == jnp.float32 and np.isfinite(np.asarray(t)).all() for t in jax.tree.leaves(g)
    )
    ref_params = _manual_merge(
        jax.tree.map(lambda t: t.astype(jnp.float32), v["params"]), v["lora"], cfg.scale
    )
    want = jax.jit(cls().apply)({"params": ref_params}, x.astype(jnp.float32))
    # bf16 has an 8-bit mantissa: relative error of a few 1e-2 after two blocks.
    err = (
        np.abs(np.asarray(y, np.float32) - np.asarray(want)).max() / np.abs(np.asarray(want)).max()
    )
    assert err < 5e-2


def test_init_lora_for_pretrained_params():
    x = _x()
    model = Encoder()
    pretrained = model.init(jax.random.key(42), x)["params"]
    before = jax.tree.map(np.array, pretrained)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=2, targets=r".*/(query|value)"))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": pretrained}, x)
    assert set(lora["layer_0"]["attn"]) == {"query", "value"}
    assert all(not np.asarray(b).any() for b in jax.tree.leaves(lora) if b.shape[0] == 2)
    np.testing.assert_array_equal(
        wrapped.apply({"params": pretrained, "lora": lora}, x),
        model.apply({"params": pretrained}, x),
    )
    jax.tree.map(np.testing.assert_array_equal, pretrained, before)


# --- bad input -----------------------------------------------------------------------


def test_rank_too_large_names_layer():
    with pytest.raises(ValueError, match=r"`rank`=5 .* min\(fan_in, fan_out\)=4 .* 'head'"):
        jax_lora.wrap(MLP(out=4), LoraConfig(rank=5, targets="fc1|head")).init(KEY, _x((2, 16)))
    # targets=None ("all-linear") leaves the output head out, so nothing raises
    v = jax_lora.wrap(MLP(out=4), LoraConfig(rank=5)).init(KEY, _x((2, 16)))
    assert set(v["lora"]) == {"fc1", "fc2"}


def test_pattern_matching_nothing_lists_candidates():
    with pytest.raises(ValueError, match="matches no supported layer") as e:
        jax_lora.wrap(MLP(), LoraConfig(rank=2, targets=["fc1", "nope"])).init(KEY, _x((2, 16)))
    assert "'nope'" in str(e.value) and "fc2  (Dense)" in str(e.value)


def test_pattern_matching_container_hints():
    with pytest.raises(ValueError, match=r"did you mean '\.\*/attn/\.\*'"):
        jax_lora.wrap(Encoder(), LoraConfig(rank=2, targets=r".*/attn")).init(KEY, _x())


def test_pattern_matching_unsupported_layer():
    with pytest.raises(
        ValueError,
        match=r"'layer_0/ln' of type flax\.linen\.normalization\.LayerNorm, which has no weight",
    ):
        jax_lora.wrap(Encoder(), LoraConfig(rank=2, targets=r"layer_0/.*")).init(KEY, _x())


def test_undecomposable_einsum_names_path():
    class PerHead(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((2, 8, 4), "bnd,ndh->bnh", name="ph")(x)

    with pytest.raises(ValueError, match="Einsum at 'ph'.*per-slice"):
        jax_lora.wrap(PerHead(), LoraConfig(rank=2)).init(KEY, _x((3, 2, 8)))


def test_missing_and_stray_factors():
    x = _x((2, 16))
    wrapped = jax_lora.wrap(MLP(), LoraConfig(rank=2, targets="fc1"))
    v = wrapped.init(KEY, x)
    with pytest.raises(ValueError, match="no LoRA factors for the targeted layer 'fc1'"):
        wrapped.apply({"params": v["params"]}, x)
    other = jax_lora.wrap(MLP(), LoraConfig(rank=2, targets="fc2"))
    with pytest.raises(ValueError, match="no LoRA factors for the targeted layer 'fc2'"):
        other.apply(v, x)
    both = dict(v, lora=dict(v["lora"], fc2=v["lora"]["fc1"]))
    with pytest.raises(ValueError, match="factors at 'fc2', but no targeted layer"):
        wrapped.apply(both, x)
    r3 = jax_lora.wrap(MLP(), LoraConfig(rank=3, targets="fc1"))
    with pytest.raises(ValueError, match=r"'fc1' have a of shape \(16, 2\).*need \(16, 3\)"):
        r3.apply(v, x)


def test_wrap_rejects_non_modules():
    with pytest.raises(TypeError, match="expects a flax.linen.Module"):
        jax_lora.wrap(lambda x: x, LoraConfig(rank=2))
    with pytest.raises(TypeError, match="`config` must be a jax_lora.LoraConfig"):
        jax_lora.wrap(MLP(), {"rank": 2})


def test_other_methods_of_the_base_via_call_method():
    class EncDec(nn.Module):
        def setup(self):
            self.enc, self.dec = nn.Dense(8), nn.Dense(4)

        def encode(self, x):
            return self.enc(x)

        def __call__(self, x):
            return self.dec(nn.relu(self.encode(x)))

    x = _x((3, 16))
    cfg = LoraConfig(rank=2, targets="enc|dec")
    wrapped = jax_lora.wrap(EncDec(), cfg)
    v = wrapped.init(KEY, x)
    assert set(v["lora"]) == {"enc", "dec"}
    v["lora"] = _randomize(v["lora"])
    got = wrapped.apply(v, "encode", x, method="call_method")
    k = v["params"]["enc"]["kernel"] + v["lora"]["enc"]["a"] @ v["lora"]["enc"]["b"]
    assert_close(got, x @ k + v["params"]["enc"]["bias"][None], 1e-5)
    # the plain method, without the wrapper, is the base model
    assert_close(
        EncDec().apply({"params": v["params"]}, x, method="encode"),
        x @ v["params"]["enc"]["kernel"] + v["params"]["enc"]["bias"][None],
        1e-6,
    )


def test_sequential_layers_are_targeted_by_their_own_paths():
    """nn.Sequential binds its layers with the model; their module paths must be `layers_0`
    (where their params are), not the wrapper's `base/layers_0` (flax keeps the stale path)."""
    seq = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4)])
    cfg = jax_lora.LoraConfig(rank=2, alpha=4.0, targets="layers_0")
    model = jax_lora.wrap(seq, cfg)
    x = jax.random.normal(jax.random.key(1), (3, 8))
    v = model.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v["lora"]) == {"layers_0": {"a": (8, 2), "b": (2, 8)}}
    b = jax.random.normal(jax.random.key(2), (2, 8))
    v = {"params": v["params"], "lora": {"layers_0": {"a": v["lora"]["layers_0"]["a"], "b": b}}}
    p, lo = v["params"], v["lora"]["layers_0"]
    h = x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"][None] + 2.0 * (x @ lo["a"]) @ lo["b"]
    want = jax.nn.relu(h) @ p["layers_2"]["kernel"] + p["layers_2"]["bias"][None]
    np.testing.assert_allclose(model.apply(v, x), want, rtol=1e-5, atol=1e-6)
