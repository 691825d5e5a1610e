"""Named adapters (jax_lora/adapters.py): layout, per-row adapters vs one-adapter runs, grads
in a mixed batch, weighted combinations, the PEFT multi-adapter folder, bad input."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_lora
from jax_lora.adapters import _multi_layers, check_ids
from tests._models import MLP, Block

CONFIGS = {
    "fr": jax_lora.LoraConfig(rank=2, alpha=4.0),
    "de": jax_lora.LoraConfig(rank=4, alpha=2.0, targets="fc1"),  # fc2 unadapted here
    "it": jax_lora.LoraConfig(rank=3, targets="fc[12]", rslora=True),
}


def _randomise(tree, scale=0.3):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return treedef.unflatten(
        [scale * jax.random.normal(k, t.shape, t.dtype) for k, t in zip(keys, leaves, strict=True)]
    )


def _setup(model=None, configs=None, x=None):
    model = model or MLP()
    configs = configs or CONFIGS
    x = jax.random.normal(jax.random.key(1), (6, 8)) if x is None else x
    wrapped = jax_lora.wrap(model, configs)
    v = wrapped.init(jax.random.key(0), x)
    v["lora"] = _randomise(v["lora"])
    return model, wrapped, v, x


def _single(model, config, params, lora, x):
    return jax_lora.wrap(model, config).apply({"params": params, "lora": lora}, x)


def _rel(got, want):
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(want).max())


def test_layout_is_one_single_adapter_tree_per_name():
    model, wrapped, v, x = _setup()
    base = model.init(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, v["params"]) == jax.tree.map(jnp.shape, base)
    assert wrapped.names == ("fr", "de", "it")
    assert sorted(jax_lora.adapter_names(v)) == ["de", "fr", "it"]
    for name, cfg in CONFIGS.items():
        want = jax.eval_shape(
            lambda cfg=cfg: jax_lora.init_lora(
                jax_lora.wrap(model, cfg), jax.random.key(3), {"params": v["params"]}, x
            )
        )
        assert jax.tree.map(jnp.shape, v["lora"][name]) == jax.tree.map(jnp.shape, want)
    assert jax.tree.map(jnp.shape, v["lora"]["de"]) == {"fc1": {"a": (8, 4), "b": (4, 16)}}


@pytest.mark.parametrize(("kind", "jit"), [("mlp", False), ("mlp", True), ("block", True)])
def test_each_row_equals_its_adapter_alone(jit, kind):
    if kind == "mlp":
        model, wrapped, v, x = _setup()
    else:  # DenseGeneral (attention) and Einsum layers; ranks 2 and 3, targets differ
        configs = {
            "p": jax_lora.LoraConfig(rank=2),
            "q": jax_lora.LoraConfig(rank=3, alpha=6.0, targets=".*(up|query|out)"),
        }
        x = jax.random.normal(jax.random.key(1), (5, 4, 16))
        model, wrapped, v, x = _setup(Block(), configs, x)
    ids = jnp.array([1, 0, -1, 2, 0, 1][: x.shape[0]]) % (len(wrapped.names) + 1) - (
        0 if kind == "mlp" else 1
    )
    ids = jnp.where(ids >= len(wrapped.names), -1, ids)

    def run(v, x, ids):
        return wrapped.apply(v, x, adapter_ids=ids)

    y = (jax.jit(run) if jit else run)(v, x, ids)
    base = model.apply({"params": v["params"]}, x)
    ids_np = np.asarray(ids)
    assert set(ids_np.tolist()) == {-1, *range(len(wrapped.names))}  # every case is exercised
    for i, (name, cfg) in enumerate(wrapped.adapters):
        alone = _single(model, cfg, v["params"], v["lora"][name], x)
        rows = ids_np == i
        assert _rel(y[rows], alone[rows]) <= 1e-6
        assert np.abs(np.asarray(alone - base)).max() > 1e-2  # each adapter changes the output
    np.testing.assert_allclose(y[ids_np == -1], base[ids_np == -1], rtol=1e-6, atol=1e-6)


def test_one_compile_for_any_mix_of_ids():
    _, wrapped, v, x = _setup()
    run = jax.jit(lambda v, x, ids: wrapped.apply(v, x, adapter_ids=ids))
    a = run(v, x, jnp.array([0, 0, 0, 0, 0, 0]))
    b = run(v, x, jnp.array([2, -1, 1, 0, 2, 1]))
    assert run._cache_size() == 1
    assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_grads_of_a_mixed_batch_are_each_adapters_own():
    """Multi-task training: the gradient for adapter k is the gradient of its own rows' loss."""
    model, wrapped, v, x = _setup()
    ids = jnp.array([0, 1, 2, 1, -1, 0])
    target = jax.random.normal(jax.random.key(5), (6, 4))

    def loss(lora):
        y = wrapped.apply({"params": v["params"], "lora": lora}, x, adapter_ids=ids)
        return jnp.sum((y - target) ** 2)

    grads = jax.jit(jax.grad(loss))(v["lora"])
    for i, (name, cfg) in enumerate(wrapped.adapters):
        rows = np.asarray(ids) == i

        def own(lora, cfg=cfg, rows=rows):
            y = _single(model, cfg, v["params"], lora, x[rows])
            return jnp.sum((y - target[rows]) ** 2)

        want = jax.jit(jax.grad(own))(v["lora"][name])
        for got_leaf, want_leaf in zip(
            jax.tree.leaves(grads[name]), jax.tree.leaves(want), strict=True
        ):
            assert np.abs(np.asarray(want_leaf)).max() > 1e-3
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-5, atol=1e-6)


def test_active_adapters_without_ids():
    model, wrapped, v, x = _setup()
    base = model.apply({"params": v["params"]}, x)
    deltas = {
        n: _single(model, c, v["params"], v["lora"][n], x) - base for n, c in wrapped.adapters
    }
    np.testing.assert_allclose(wrapped.apply(v, x), base + deltas["fr"], rtol=1e-6, atol=1e-6)
    # two active adapters add their branches at each layer: one rank-7 adapter with the scales
    # folded into `a` (zero-padded at fc2, where only "it" is) computes the same
    de, it = v["lora"]["de"], v["lora"]["it"]
    s_de, s_it = CONFIGS["de"].scale, CONFIGS["it"].scale
    joint = {
        "fc1": {
            "a": jnp.concatenate([s_de * de["fc1"]["a"], s_it * it["fc1"]["a"]], axis=1),
            "b": jnp.concatenate([de["fc1"]["b"], it["fc1"]["b"]], axis=0),
        },
        "fc2": {
            "a": jnp.pad(s_it * it["fc2"]["a"], ((0, 0), (0, 4))),
            "b": jnp.pad(it["fc2"]["b"], ((0, 4), (0, 0))),
        },
    }
    one = _single(model, jax_lora.LoraConfig(rank=7, targets="fc[12]"), v["params"], joint, x)
    both = wrapped.clone(active=("de", "it")).apply(v, x)
    assert _rel(both, one) <= 1e-6
    assert _rel(both, base + deltas["de"]) > 1e-2  # "it" matters
    np.testing.assert_array_equal(wrapped.clone(active=()).apply(v, x), base)
    np.testing.assert_array_equal(wrapped.clone(enabled=False).apply(v, x), base)
    with jax_lora.disabled():
        np.testing.assert_array_equal(wrapped.apply(v, x), base)


def test_tree_helpers_copy_and_check():
    model, wrapped, v, x = _setup()
    before = jax.tree.map(np.asarray, v)
    fewer = jax_lora.delete_adapter(v, "de")
    assert sorted(jax_lora.adapter_names(fewer)) == ["fr", "it"]
    back = jax_lora.add_adapter(fewer, "de", v["lora"]["de"])
    assert sorted(jax_lora.adapter_names(back)) == ["de", "fr", "it"]
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, v), before)
    with pytest.raises(ValueError, match="adapter 'fr' already exists"):
        jax_lora.add_adapter(v, "fr", v["lora"]["fr"])
    with pytest.raises(KeyError, match="no adapter 'xx' to delete"):
        jax_lora.delete_adapter(v, "xx")
    with pytest.raises(ValueError, match="factor node"):
        jax_lora.add_adapter(fewer, "de", {"fc1": {"A": np.ones((8, 2)), "B": np.ones((2, 16))}})
    # a wrapper without "de": its trees are the other two, ids shift
    two = wrapped.without_adapter("de")
    assert two.names == ("fr", "it")
    y = two.apply(fewer, x, adapter_ids=jnp.array([1] * 6))
    want = _single(model, CONFIGS["it"], v["params"], v["lora"]["it"], x)
    assert _rel(y, want) <= 1e-6
    three = two.with_adapter("de", CONFIGS["de"])
    assert three.names == ("fr", "it", "de")
    with pytest.raises(ValueError, match="missing: 'de'"):
        three.apply(fewer, x)


def test_bad_ids():
    _, wrapped, v, x = _setup()
    with pytest.raises(ValueError, match=r"`adapter_ids`\[2\] = 3 is out of range"):
        wrapped.apply(v, x, adapter_ids=jnp.array([0, 1, 3, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"`adapter_ids`\[0\] = -2"):
        wrapped.apply(v, x, adapter_ids=np.array([-2, 1, 0, 0, 0, 0]))
    with pytest.raises(TypeError, match="integer array"):
        wrapped.apply(v, x, adapter_ids=jnp.zeros(6))
    with pytest.raises(ValueError, match=r"shape \(batch,\)"):
        wrapped.apply(v, x, adapter_ids=jnp.zeros((6, 1), jnp.int32))
    with pytest.raises(ValueError, match="has 3 rows, but the input of layer 'fc1'"):
        wrapped.apply(v, x, adapter_ids=jnp.array([0, 1, 2]))
    # traced ids cannot raise: out of range gives the base row, documented
    y = jax.jit(lambda i: wrapped.apply(v, x, adapter_ids=i))(jnp.array([0, 7, -5, 0, 0, 0]))
    base = MLP().apply({"params": v["params"]}, x)
    np.testing.assert_allclose(y[1:3], base[1:3], rtol=1e-5, atol=1e-6)
    assert _rel(y[0], base[0]) > 1e-2
    assert check_ids(np.array([2, -1]), 3).dtype == jnp.int32


def test_bad_names_and_trees():
    model, wrapped, v, x = _setup()
    with pytest.raises(ValueError, match="unknown adapter 'es' in `active`"):
        wrapped.clone(active="es").apply(v, x)
    extra = jax_lora.add_adapter(v, "es", v["lora"]["fr"])
    with pytest.raises(ValueError, match="unknown: 'es'"):
        wrapped.apply(extra, x)
    with pytest.raises(ValueError, match="adapter name"):
        jax_lora.wrap(model, {"a/b": CONFIGS["fr"]})
    with pytest.raises(TypeError, match="for named adapters; adapter 'x' got 3"):
        jax_lora.wrap(model, {"x": 3})
    with pytest.raises(ValueError, match="dropout"):
        jax_lora.wrap(model, {"x": jax_lora.LoraConfig(rank=2, dropout=0.1)})
    # an adapter made for another base (wider fc1): the shape check names adapter and path
    other = jax_lora.wrap(MLP(hidden=32), {"fr": CONFIGS["fr"]})
    w_other = other.init(jax.random.key(0), x)["lora"]["fr"]
    bad = {**v, "lora": {**v["lora"], "fr": w_other}}
    with pytest.raises(ValueError, match=r"adapter 'fr' at 'fc1': a \(8, 2\), b \(2, 32\)"):
        wrapped.apply(bad, x)
    # factors at a layer that does not exist in this model
    stray = {**v, "lora": {**v["lora"], "de": {**v["lora"]["de"], "fc9": v["lora"]["de"]["fc1"]}}}
    with pytest.raises(ValueError, match="adapter 'de' has factors at 'fc9'"):
        wrapped.apply(stray, x)


# --- weighted combination ---------------------------------------------------------------------


def _delta(node, scale):
    return scale * np.asarray(node["a"], np.float64) @ np.asarray(node["b"], np.float64)


def test_combine_cat_is_the_exact_weighted_sum():
    model, _, v, x = _setup()
    weights = {"fr": 0.7, "de": -1.3, "it": 2.0}
    tree, cfg = jax_lora.combine_adapters(v["lora"], CONFIGS, weights, combination="cat")
    assert cfg.rank == 9 and cfg.scale == 1.0
    assert tree["fc2"]["a"].shape == (16, 9)  # "de" is absent at fc2: zeros at the end
    for layer in ("fc1", "fc2"):
        want = sum(
            w * _delta(v["lora"][k][layer], CONFIGS[k].scale)
            for k, w in weights.items()
            if layer in v["lora"][k]
        )
        np.testing.assert_allclose(_delta(tree[layer], 1.0), want, rtol=1e-5, atol=1e-5)
    # the combined adapter runs as an ordinary single adapter
    y = jax_lora.wrap(model, cfg).apply({"params": v["params"], "lora": tree}, x)
    assert y.shape == (6, 4)


def test_combine_linear_follows_peft_sqrt_rule():
    _, _, v, _ = _setup()
    configs = {"p": jax_lora.LoraConfig(rank=2, alpha=4.0), "q": jax_lora.LoraConfig(rank=2)}
    lora = {"p": v["lora"]["fr"], "q": v["lora"]["fr"]}
    lora = {"p": lora["p"], "q": jax.tree.map(lambda t: 2.0 * t + 0.1, lora["q"])}
    tree, cfg = jax_lora.combine_adapters(
        lora, configs, {"p": 0.5, "q": -3.0}, combination="linear"
    )
    wp, wq = 0.5 * 2.0, -3.0 * 1.0  # weight * scale
    node_p, node_q = lora["p"]["fc1"], lora["q"]["fc1"]
    want_a = np.sqrt(wp) * node_p["a"] - np.sqrt(3.0) * node_q["a"]
    want_b = np.sqrt(wp) * node_p["b"] + np.sqrt(abs(wq)) * node_q["b"]
    np.testing.assert_allclose(tree["fc1"]["a"], want_a, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tree["fc1"]["b"], want_b, rtol=1e-6, atol=1e-6)
    assert cfg.rank == 2
    with pytest.raises(ValueError, match="one rank"):
        jax_lora.combine_adapters(v["lora"], CONFIGS, {"fr": 1, "de": 1}, combination="linear")


def test_combine_svd_is_the_best_rank_r_approximation():
    _, _, v, _ = _setup()
    weights = {"fr": 1.0, "de": 0.5}
    full, _ = jax_lora.combine_adapters(v["lora"], CONFIGS, weights, combination="svd", rank=6)
    want = _delta(v["lora"]["fr"]["fc1"], 2.0) + 0.5 * _delta(v["lora"]["de"]["fc1"], 0.5)
    np.testing.assert_allclose(_delta(full["fc1"], 1.0), want, rtol=1e-4, atol=1e-5)  # rank 6
    low, cfg = jax_lora.combine_adapters(v["lora"], CONFIGS, weights, combination="svd")
    assert cfg.rank == 4 and low["fc1"]["a"].shape == (8, 4)
    u, s, vt = np.linalg.svd(want)
    best = (u[:, :4] * s[:4]) @ vt[:4]
    np.testing.assert_allclose(_delta(low["fc1"], 1.0), best, rtol=1e-4, atol=1e-5)
    assert np.abs(best - want).max() > 1e-3  # truncation really happened
    with pytest.raises(KeyError, match="no adapter 'xx'"):
        jax_lora.combine_adapters(v["lora"], CONFIGS, {"xx": 1.0})
    with pytest.raises(ValueError, match="`combination` must be one of"):
        jax_lora.combine_adapters(v["lora"], CONFIGS, weights, combination="ties")


# --- PEFT's folder per adapter ----------------------------------------------------------------


def test_export_import_adapters_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    _, _, v, _ = _setup()
    out = tmp_path / "adapters"
    lora = {"default": v["lora"]["fr"], "de": v["lora"]["de"], "it": v["lora"]["it"]}
    configs = {"default": CONFIGS["fr"], "de": CONFIGS["de"], "it": CONFIGS["it"]}
    jax_lora.export_peft_adapters(out, lora, configs)
    assert sorted(os.listdir(out)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "de",
        "it",
    ]
    trees, cfgs = jax_lora.import_peft_adapters(out)
    assert list(trees) == ["default", "de", "it"]
    for k in lora:
        jax.tree.map(
            lambda got, want: np.testing.assert_allclose(got, want, rtol=0, atol=0),
            trees[k],
            jax.tree.map(np.asarray, lora[k]),
        )
        assert cfgs[k].scale == pytest.approx(configs[k].scale)
    # a second export refuses a non-empty folder and leaves it intact
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        jax_lora.export_peft_adapters(out, {"de": lora["de"]}, configs)
    assert (out / "keep.txt").read_text() == "mine" and (out / "it").is_dir()
    with pytest.raises(KeyError, match="no adapter 'es'"):
        jax_lora.import_peft_adapters(out, names=["es"])
    # a failing export (the second adapter's tree is malformed) leaves the folder as it was
    broken = {"de": lora["de"], "it": {"fc1": {"a": np.ones((8, 3))}}}
    with pytest.raises(ValueError, match="fc1"):
        jax_lora.export_peft_adapters(out, broken, configs, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine" and (out / "it").is_dir()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]
    jax_lora.export_peft_adapters(out, {"de": lora["de"]}, configs, overwrite=True)
    assert sorted(os.listdir(out)) == ["de"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_wrap_rejects_wrapping_twice():
    _, wrapped, _, _ = _setup()
    with pytest.raises(ValueError, match="already has named adapters"):
        jax_lora.wrap(wrapped, CONFIGS)
    assert isinstance(wrapped, nn.Module)
    with pytest.raises(TypeError, match="take a flax.linen.Module or an nnx.Module; got int"):
        jax_lora.wrap(3, CONFIGS)


# --- NNX ----------------------------------------------------------------------------------


class _NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def _nnx_setup():
    base = _NnxMLP(nnx.Rngs(0))
    model = jax_lora.wrap(nnx.clone(base), CONFIGS, rngs=nnx.Rngs(1))
    for path, layer in _multi_layers(model):
        for k, node in layer.lora_adapters.items():
            key = jax.random.key(hash((path, k)) % 1000)
            node["b"][...] = 0.3 * jax.random.normal(key, node["b"][...].shape)
    return base, model, jax.random.normal(jax.random.key(2), (6, 8))


def _nnx_single(base, name, lora):
    single = jax_lora.wrap(nnx.clone(base), CONFIGS[name], rngs=nnx.Rngs(5))
    jax_lora.load_lora(single, lora)
    return single


def test_nnx_named_adapters_per_row_and_active():
    base, model, x = _nnx_setup()
    state = jax_lora.adapters_state(model)
    assert jax.tree.map(jnp.shape, state["de"]) == {"fc1": {"a": (8, 4), "b": (4, 16)}}
    assert set(state["fr"]) == {"fc1", "fc2", "head"}  # NNX all-linear includes the head
    ids = jnp.array([1, 0, -1, 2, 2, 0])

    @nnx.jit
    def serve(model, x, ids):
        with jax_lora.adapter_ids(ids):
            return model(x)

    y = serve(model, x, ids)
    for i, name in enumerate(CONFIGS):
        alone = _nnx_single(base, name, state[name])(x)
        rows = np.asarray(ids) == i
        assert _rel(y[rows], alone[rows]) <= 1e-6
        assert _rel(alone, base(x)) > 1e-2
    np.testing.assert_allclose(y[2], base(x)[2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        model(x), _nnx_single(base, "fr", state["fr"])(x), rtol=1e-6, atol=1e-6
    )  # first adapter by default
    jax_lora.set_active_adapters(model, "it")
    assert _rel(model(x), _nnx_single(base, "it", state["it"])(x)) <= 1e-6
    jax_lora.set_active_adapters(model, ())
    np.testing.assert_array_equal(model(x), base(x))
    with pytest.raises(ValueError, match="unknown adapter 'es'"):
        jax_lora.set_active_adapters(model, "es")
    bad = jax_lora.adapter_ids(jnp.array([3, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match=r"`adapter_ids`\[0\] = 3 is out of range"), bad:
        model(x)


def test_nnx_mixed_batch_grads_are_each_adapters_own():
    base, model, x = _nnx_setup()
    ids = jnp.array([0, 1, 2, 1, -1, 0])
    target = jax.random.normal(jax.random.key(5), (6, 4))
    lora_only = nnx.DiffState(0, nnx.LoRAParam)

    def loss(model):
        with jax_lora.adapter_ids(ids):
            return jnp.sum((model(x) - target) ** 2)

    grads = nnx.to_pure_dict(nnx.grad(loss, argnums=lora_only)(model))
    state = jax_lora.adapters_state(model)
    for i, name in enumerate(CONFIGS):
        rows = np.asarray(ids) == i

        def own(single, rows=rows):
            return jnp.sum((single(x[rows]) - target[rows]) ** 2)

        want = nnx.to_pure_dict(
            nnx.grad(own, argnums=lora_only)(_nnx_single(base, name, state[name]))
        )
        for layer in state[name]:
            for f in ("a", "b"):
                w = want[layer][f"lora_{f}"]
                assert np.abs(np.asarray(w)).max() > 1e-3
                got = grads[layer]["lora_adapters"][name][f]
                np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-6)


def test_nnx_bad_input_leaves_model_unchanged():
    model = _NnxMLP(nnx.Rngs(0))
    emb = jax_lora.LoraConfig(rank=2, targets="fc1")
    jax_lora.wrap(model, {"a": emb})
    with pytest.raises(ValueError, match="already has named adapters"):
        jax_lora.wrap(model, {"b": emb})
    fresh = _NnxMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="matches no"):
        jax_lora.wrap(fresh, {"a": emb, "b": jax_lora.LoraConfig(1, targets="zz")})
    assert type(fresh.fc1) is nnx.Linear and not hasattr(fresh.fc1, "lora_adapters")
    with pytest.raises(ValueError, match="no named adapters"):
        jax_lora.adapters_state(fresh)


# --- adversarial cases (H-ADV) ----------------------------------------------------------------


def test_combine_uses_each_layers_alpha_and_rank_pattern():
    # bug: combine_adapters scaled every layer by `config.scale`, ignoring alpha_pattern (silently
    # wrong) and read the rank from `config.rank`, ignoring rank_pattern (crash / bad shapes)
    cfgs = {
        "p": jax_lora.LoraConfig(rank=2, alpha_pattern={"fc1": 8.0}),
        "q": jax_lora.LoraConfig(rank=2, rank_pattern={"fc1": 5}, alpha=3.0),
    }
    model, _, v, x = _setup(configs=cfgs)
    want = {
        layer: 0.5 * _delta(v["lora"]["p"][layer], cfgs["p"].scale_for(layer))
        - 2.0 * _delta(v["lora"]["q"][layer], cfgs["q"].scale_for(layer))
        for layer in ("fc1", "fc2")
    }
    weights = {"p": 0.5, "q": -2.0}
    for comb, rank in (("cat", None), ("svd", 7)):
        tree, cfg = jax_lora.combine_adapters(v["lora"], cfgs, weights, combination=comb, rank=rank)
        for layer, d in want.items():
            r = tree[layer]["a"].shape[-1]
            assert cfg.rank_for(layer) == r and cfg.scale_for(layer) == 1.0, (comb, layer)
            np.testing.assert_allclose(_delta(tree[layer], 1.0), d, rtol=1e-4, atol=1e-5)
        assert tree["fc1"]["a"].shape == (8, 7) and tree["fc2"]["a"].shape[-1] == (
            4 if comb == "cat" else 7
        )
        y = jax_lora.wrap(model, cfg).apply({"params": v["params"], "lora": tree}, x)
        assert y.shape == (6, 4)
    # one adapter alone ("linear" then) must reproduce that adapter's own output
    tree, cfg = jax_lora.combine_adapters(v["lora"], cfgs, {"q": 1.0})
    alone = _single(model, cfgs["q"], v["params"], v["lora"]["q"], x)
    combined = jax_lora.wrap(model, cfg).apply({"params": v["params"], "lora": tree}, x)
    assert _rel(combined, alone) <= 1e-5
    with pytest.raises(ValueError, match="'fc1'.*ranks"):
        jax_lora.combine_adapters(v["lora"], cfgs, weights, combination="linear")


def test_combine_rejects_nan_weights_and_bad_rank():
    # bug: a NaN weight gave NaN factors silently; rank=0 silently meant the default rank
    _, _, v, _ = _setup()
    with pytest.raises(ValueError, match=r"`weights`\['de'\] must be a finite number"):
        jax_lora.combine_adapters(v["lora"], CONFIGS, {"fr": 1.0, "de": float("nan")})
    with pytest.raises(ValueError, match="`rank` must be an int >= 1"):
        jax_lora.combine_adapters(v["lora"], CONFIGS, {"fr": 1.0, "de": 1.0}, rank=0)
    tree, _ = jax_lora.combine_adapters(v["lora"], CONFIGS, {"fr": jnp.float32(0.5), "de": 1})
    assert np.isfinite(np.asarray(tree["fc1"]["a"])).all()


@pytest.mark.parametrize("bad", ["..", ".", ".hidden", "a.b", "a\\b", "a\x00b"])
def test_names_that_are_not_safe_folder_names_are_refused(tmp_path, bad):
    # bug: export_peft_adapters wrote adapter '..' into the PARENT folder and then replaced the
    # whole parent with it (the user's other files there were deleted); '.' silently overwrote
    # 'default'; '.hidden' exported but import_peft_adapters skipped it (PEFT itself forbids
    # '.' in adapter names: torch ModuleDict keys)
    with pytest.raises(ValueError, match="adapter name"):
        jax_lora.wrap(MLP(), {"default": CONFIGS["fr"], bad: CONFIGS["fr"]})
    _, _, v, _ = _setup(configs={"default": CONFIGS["fr"]})
    with pytest.raises(ValueError, match="adapter name"):
        jax_lora.add_adapter(v, bad, v["lora"]["default"])
    (tmp_path / "precious.txt").write_text("keep me")
    lora = {"default": v["lora"]["default"], bad: v["lora"]["default"]}
    configs = {"default": CONFIGS["fr"], bad: CONFIGS["fr"]}
    with pytest.raises(ValueError, match="adapter name"):
        jax_lora.export_peft_adapters(tmp_path / "out", lora, configs)
    assert sorted(os.listdir(tmp_path)) == ["precious.txt"]
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_nnx_ids_set_outside_jit_are_refused_not_baked_in():
    # bug: `with adapter_ids(ids): jitted(model, x)` baked the first ids into the compiled
    # function, and the cache served every later call: other ids silently gave the first ids'
    # output
    base, model, x = _nnx_setup()
    serve = nnx.jit(lambda model, x: model(x))
    ids = jax_lora.adapter_ids(jnp.zeros((6,), jnp.int32))
    with ids, pytest.raises(ValueError, match="inside the jitted function"):
        serve(model, x)
    # ids entered inside the jitted function (traced or constant) and eager grads still work
    state = jax_lora.adapters_state(model)

    @nnx.jit
    def const(model, x):
        with jax_lora.adapter_ids(np.full((6,), 1, np.int32)):
            return model(x)

    assert _rel(const(model, x), _nnx_single(base, "de", state["de"])(x)) <= 1e-6
    with jax_lora.adapter_ids(jnp.full((6,), 2, jnp.int32)):
        g = nnx.grad(lambda m: jnp.sum(m(x)), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert np.abs(np.asarray(nnx.to_pure_dict(g)["fc1"]["lora_adapters"]["it"]["a"])).max() > 0


def test_active_lists_an_adapter_once():
    # bug: active=("fr", "fr") silently added the "fr" branch twice (linen and NNX)
    _, wrapped, v, x = _setup()
    with pytest.raises(ValueError, match="'fr' twice"):
        wrapped.clone(active=("fr", "fr")).apply(v, x)
    y = wrapped.clone(active=["fr", "it"]).apply(v, x)  # a list is fine
    assert _rel(y, wrapped.clone(active=("fr", "it")).apply(v, x)) == 0.0
    _, model, _ = _nnx_setup()
    with pytest.raises(ValueError, match="'it' twice"):
        jax_lora.set_active_adapters(model, ["it", "de", "it"])


def test_import_adapters_refuses_empty_and_half_written_folders(tmp_path):
    # bugs: a folder with no adapter at all imported as ({}, {}) (a wrong path silently gave no
    # adapters); a subfolder with the weights but no adapter_config.json was skipped silently
    pytest.importorskip("safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no PEFT adapter"):
        jax_lora.import_peft_adapters(tmp_path / "empty")
    configs = {"default": CONFIGS["fr"], "it": CONFIGS["it"]}
    _, _, v, _ = _setup(configs=configs)
    out = tmp_path / "out"
    jax_lora.export_peft_adapters(out, v["lora"], configs)
    os.remove(out / "it" / "adapter_config.json")
    with pytest.raises(ValueError, match=r"'it'.*adapter_model\.safetensors.*no adapter_config"):
        jax_lora.import_peft_adapters(out)
    trees, _ = jax_lora.import_peft_adapters(out, names=["default"])  # picking around it is fine
    np.testing.assert_array_equal(trees["default"]["fc1"]["a"], v["lora"]["default"]["fc1"]["a"])


def test_import_adapters_refuses_two_defaults(tmp_path):
    # bug: a root adapter and a subfolder named 'default' were both "default": the subfolder was
    # silently ignored
    pytest.importorskip("safetensors")
    configs = {"default": CONFIGS["fr"], "it": CONFIGS["it"]}
    _, _, v, _ = _setup(configs=configs)
    out = tmp_path / "out"
    jax_lora.export_peft_adapters(out, v["lora"], configs)
    os.rename(out / "it", out / "default")
    with pytest.raises(ValueError, match="two adapters named 'default'"):
        jax_lora.import_peft_adapters(out)


def test_scanned_stacks_get_a_clear_error():
    # bug: on an nn.scan stack the factors are stacked (L, in, r) but each scanned call sees one
    # layer: apply failed with "Was this adapter made for another base model?" (misleading)
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(8, name="fc")(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(
                Layer, variable_axes={"params": 0, "lora": 0}, length=3, split_rngs={"params": True}
            )
            return scan(name="blocks")(x, None)[0]

    x = jnp.ones((2, 8))
    wrapped = jax_lora.wrap(Stack(), {"p": CONFIGS["fr"]})
    v = wrapped.init(jax.random.key(0), x)
    assert v["lora"]["p"]["blocks"]["fc"]["a"].shape == (3, 8, 2)
    with pytest.raises(ValueError, match=r"'blocks/fc'.*stacked.*\(3,\).*nn\.scan"):
        wrapped.apply(v, x)


def test_factors_of_another_rank_than_the_config_are_refused():
    # bug: a tree of rank 2 declared with a rank-4 config ran at the rank-4 scale (alpha / 4)
    # silently; the single-adapter wrap refuses such factors
    _, wrapped, v, x = _setup()
    w2 = wrapped.with_adapter("xx", jax_lora.LoraConfig(rank=4, alpha=8.0))
    v2 = jax_lora.add_adapter(v, "xx", v["lora"]["fr"])  # rank 2 factors
    with pytest.raises(ValueError, match=r"adapter 'xx' at 'fc1'.*rank 2.*config.*rank 4"):
        w2.apply(v2, x, adapter_ids=jnp.full((6,), 3))
    with pytest.raises(ValueError, match=r"adapter 'xx' at 'fc1'.*rank 2.*config.*rank 4"):
        w2.clone(active="xx").apply(v2, x)
    ok = wrapped.with_adapter("xx", jax_lora.LoraConfig(rank=2, alpha=4.0))
    np.testing.assert_array_equal(
        ok.apply(v2, x, adapter_ids=jnp.full((6,), 3)),
        wrapped.apply(v, x, adapter_ids=jnp.zeros((6,), jnp.int32)),
    )


def test_merge_and_pissa_of_named_adapters_say_pick_one():
    # bug: merge(v, named_wrapper, x) said "example inputs are only used with a wrapped model"
    # (it is one); with a config, "`lora` has factors at 'fr/fc1' but `params` has no layer"
    _, wrapped, v, x = _setup()
    for fn in (jax_lora.merge, jax_lora.init_from_weights):
        with pytest.raises(TypeError, match=r"named adapters 'fr', 'de', 'it'.*\['lora'\]\[name\]"):
            fn(v, wrapped, x)
        with pytest.raises(ValueError, match=r"'(fr|de|it)/fc1'.*one adapter's tree"):
            fn(v, CONFIGS["fr"])
    merged = jax_lora.merge({"params": v["params"], "lora": v["lora"]["fr"]}, CONFIGS["fr"])
    want = (
        v["params"]["fc1"]["kernel"]
        + 2.0 * v["lora"]["fr"]["fc1"]["a"] @ v["lora"]["fr"]["fc1"]["b"]
    )
    np.testing.assert_allclose(merged["fc1"]["kernel"], want, rtol=1e-5, atol=1e-6)


def test_checkpoint_of_named_adapters_and_step_passed_as_like(tmp_path):
    # bug: `ckpt.restore(1)` (the step passed positionally, where `like` goes) failed with "the
    # checkpoint at step 1 has no factor '' that the model needs (shape ())"
    cfg = jax_lora.LoraConfig(rank=2, rank_pattern={"fc1": 3}, alpha_pattern={"fc2": 5.0})
    _, _, v, _ = _setup(configs={"p": cfg, "q": CONFIGS["it"]})
    with jax.numpy_dtype_promotion("standard"), jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, v["lora"], cfg)
        ck.wait()
        with pytest.raises(TypeError, match=r"`like`.*got int.*restore\(like, step=1\)"):
            ck.restore(1)
        r = ck.restore(v["lora"], step=1)
    assert r.config == cfg and r.config.rank_for("fc1") == 3
    jax.tree.map(np.testing.assert_array_equal, r.lora, v["lora"])


def test_combine_stacked_factors_whose_depth_equals_the_rank():
    # bug: for scanned stacks a (L, in, r), b (L, r, out) with L == r the rank axis of b was
    # taken to be axis 0 (the layer axis): silently wrong combined factors
    rng = np.random.default_rng(0)
    layers, r = 3, 3
    lora = {
        k: {
            "blocks": {
                "fc": {
                    "a": rng.normal(size=(layers, 5, r)).astype(np.float32),
                    "b": rng.normal(size=(layers, r, 6)).astype(np.float32),
                }
            }
        }
        for k in ("p", "q")
    }
    configs = {"p": jax_lora.LoraConfig(rank=r), "q": jax_lora.LoraConfig(rank=r, alpha=6.0)}
    for comb in ("cat", "svd"):
        tree, _ = jax_lora.combine_adapters(
            lora, configs, {"p": 1.0, "q": -0.5}, combination=comb, rank=5
        )
        node = tree["blocks"]["fc"]
        for i in range(layers):
            want = sum(
                w
                * configs[k].scale
                * lora[k]["blocks"]["fc"]["a"][i].astype(np.float64)
                @ lora[k]["blocks"]["fc"]["b"][i]
                for k, w in (("p", 1.0), ("q", -0.5))
            )
            got = np.asarray(node["a"][i], np.float64) @ np.asarray(node["b"][i], np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"{comb} {i}")


def test_export_of_no_adapters_is_refused(tmp_path):
    # bug: export_peft_adapters(d, {}, {}) wrote an empty folder (and replaced a non-empty one
    # with overwrite=True) without a word
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="no adapters to export"):
        jax_lora.export_peft_adapters(tmp_path / "old", {}, {}, overwrite=True)
    assert (tmp_path / "old" / "keep.txt").read_text() == "x"
    with pytest.raises(ValueError, match="no adapters to export"):
        jax_lora.export_peft_adapters(tmp_path / "new", {}, {})
    assert not (tmp_path / "new").exists()
