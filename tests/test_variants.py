"""PEFT's LoRA variants: per-layer rank and alpha (``rank_pattern`` / ``alpha_pattern``), LoRA+,
PiSSA / OLoRA initialisation and their conversion to plain LoRA."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from _models import MLP, Encoder
from flax import nnx

import jax_lora
from jax_lora import LoraConfig
from jax_lora.checkpoint import config_from_json, config_to_json

# --- rank_pattern / alpha_pattern ----------------------------------------------------------

MIXED = LoraConfig(
    rank=4,
    alpha=8,
    targets=["fc1", "fc2", "head"],
    rank_pattern={"fc2": 2, "^head": 1},
    alpha_pattern={"fc1": 2.0},
)
# the independent reading of MIXED: (rank, scale = alpha / rank) per layer
MIXED_LAYERS = {"fc1": (4, 2.0 / 4), "fc2": (2, 8.0 / 2), "head": (1, 8.0 / 1)}


def _random_lora(shapes, seed=1):
    keys = iter(jax.random.split(jax.random.key(seed), 2 * len(shapes)))
    return {
        n: {k: 0.3 * jax.random.normal(next(keys), s[k], jnp.float32) for k in ("a", "b")}
        for n, s in shapes.items()
    }


def _mlp_by_hand(params, lora, x, layers=MIXED_LAYERS):
    """tests/_models.MLP with ``h @ W + bias + scale * h @ a @ b`` per layer, in numpy."""
    h = np.asarray(x, np.float64)
    for n in ("fc1", "fc2", "head"):
        p, f = params[n], lora[n]
        w, bias = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
        a, b = np.asarray(f["a"], np.float64), np.asarray(f["b"], np.float64)
        h = h @ w + bias + layers[n][1] * (h @ a) @ b
        h = np.maximum(h, 0) if n != "head" else h
    return h


def test_config_rank_for_and_scale_for():
    assert [MIXED.rank_for(n) for n in ("fc1", "enc/fc2", "head")] == [4, 2, 1]
    assert MIXED.rank_for("head2") == 4 and MIXED.rank_for("x/head") == 4  # "^head" is pinned
    assert MIXED.scale_for("fc1") == 0.5 and MIXED.scale_for("fc2") == 4.0
    rs = LoraConfig(rank=4, alpha=8, rslora=True, rank_pattern={"q": 16})
    assert rs.scale_for("q") == 8 / 4 and rs.scale_for("k") == 8 / 2
    first = LoraConfig(rank=4, rank_pattern={"a/.*": 2, "b": 3})
    assert first.rank_for("a/b") == 2  # the first key that matches wins, as in PEFT
    assert MIXED.rank_pattern == (("fc2", 2), ("^head", 1))
    assert hash(MIXED) == hash(LoraConfig(**{**MIXED.__dict__}))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"rank_pattern": {"fc": 0}}, ValueError, r"`rank_pattern`\['fc'\] must be an int >= 1"),
        ({"rank_pattern": {"fc": 2.0}}, TypeError, r"`rank_pattern`\['fc'\]"),
        ({"rank_pattern": {"fc": True}}, TypeError, r"`rank_pattern`\['fc'\]"),
        ({"rank_pattern": {3: 2}}, TypeError, "`rank_pattern` keys must be regex strings"),
        ({"rank_pattern": {"(": 2}}, ValueError, r"`rank_pattern` pattern '\(' is not a valid"),
        ({"rank_pattern": "fc"}, TypeError, "`rank_pattern` must be a dict"),
        ({"rank_pattern": [("a", 1), ("a", 2)]}, ValueError, "lists the pattern 'a' twice"),
        ({"alpha_pattern": {"fc": -1}}, ValueError, r"`alpha_pattern`\['fc'\] must be a finite"),
        ({"alpha_pattern": {"fc": "8"}}, TypeError, r"`alpha_pattern`\['fc'\]"),
    ],
)
def test_config_patterns_validated(kwargs, error, match):
    with pytest.raises(error, match=match):
        LoraConfig(rank=4, **kwargs)


def test_linen_mixed_ranks_shapes_forward_and_merge():
    wrapped = jax_lora.wrap(MLP(), MIXED)
    x = jax.random.normal(jax.random.key(0), (3, 8))
    variables = wrapped.init(jax.random.key(1), x)
    shapes = jax.tree.map(np.shape, variables["lora"])
    assert shapes == {
        "fc1": {"a": (8, 4), "b": (4, 16)},
        "fc2": {"a": (16, 2), "b": (2, 16)},
        "head": {"a": (16, 1), "b": (1, 4)},
    }
    lora = _random_lora(shapes)
    got = wrapped.apply({"params": variables["params"], "lora": lora}, x)
    assert_close(got, _mlp_by_hand(variables["params"], lora, x), 1e-5)
    merged = jax_lora.merge({"params": variables["params"], "lora": lora}, MIXED)
    assert_close(MLP().apply({"params": merged}, x), got, 1e-5)
    assert jax_lora.param_report(variables).trainable == 8 * 4 + 4 * 16 + 16 * 2 * 2 + 16 + 4


def test_nnx_mixed_ranks_shapes_forward_and_merge():
    class NnxMLP(nnx.Module):
        def __init__(self, rngs):
            self.fc1, self.fc2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)
            self.head = nnx.Linear(16, 4, rngs=rngs)

        def __call__(self, x):
            return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))

    model = jax_lora.wrap(NnxMLP(nnx.Rngs(0)), MIXED, rngs=nnx.Rngs(1))
    shapes = jax.tree.map(np.shape, jax_lora.lora_state(model))
    assert shapes == {
        "fc1": {"a": (8, 4), "b": (4, 16)},
        "fc2": {"a": (16, 2), "b": (2, 16)},
        "head": {"a": (16, 1), "b": (1, 4)},
    }
    lora = _random_lora(shapes)
    jax_lora.load_lora(model, lora)
    x = jax.random.normal(jax.random.key(0), (3, 8))
    params = {
        n: {"kernel": getattr(model, n).kernel[...], "bias": getattr(model, n).bias[...]}
        for n in ("fc1", "fc2", "head")
    }
    assert_close(model(x), _mlp_by_hand(params, lora, x), 1e-5)
    assert_close(jax_lora.merge(model)(x), _mlp_by_hand(params, lora, x), 1e-5)
    assert jax_lora.param_report(model).trainable == 8 * 4 + 4 * 16 + 16 * 2 * 2 + 16 + 4


def test_multi_axis_layers_with_per_layer_ranks_forward_equals_merge():
    """DenseGeneral heads and Einsum kernels: each layer's rank from rank_pattern; the forward
    (branch) and merge (delta-W) agree, so each layer uses its own scale in both."""
    cfg = LoraConfig(
        rank=2,
        alpha=4,
        targets=[r".*/attn/(query|value)", r".*/up"],
        rank_pattern={"up": 3, "layer_1/attn/query": 5},
        alpha_pattern={"value": 1.0},
    )
    wrapped, x = jax_lora.wrap(Encoder(), cfg), jax.random.normal(jax.random.key(0), (1, 4, 16))
    v = wrapped.init(jax.random.key(1), x)
    shapes = jax.tree.map(np.shape, v["lora"])
    for i, (rq, rv) in enumerate([(2, 2), (5, 2)]):
        layer = shapes[f"layer_{i}"]
        assert layer["attn"]["query"] == {"a": (16, rq), "b": (rq, 2, 8)}
        assert layer["attn"]["value"] == {"a": (16, rv), "b": (rv, 2, 8)}
        assert layer["up"] == {"a": (16, 3), "b": (3, 2, 16)}
    keys = iter(jax.random.split(jax.random.key(2), 64))
    lora = jax.tree.map(
        lambda s: 0.3 * jax.random.normal(next(keys), s),
        shapes,
        is_leaf=lambda t: isinstance(t, tuple),
    )
    got = wrapped.apply({"params": v["params"], "lora": lora}, x)
    merged = jax_lora.merge({"params": v["params"], "lora": lora}, cfg)
    assert_close(got, Encoder().apply({"params": merged}, x), 1e-5)
    assert not np.allclose(got, Encoder().apply({"params": v["params"]}, x), atol=1e-3)


class _EmbedMLP(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(4, name="fc")(nn.Embed(10, 6, name="emb")(ids))


def _by_hand(params, lora, ids):
    """_EmbedMLP with LoRA (embedding: rank 5, scale 10/5; fc: rank 2, scale 1), in numpy."""
    p, f = jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, lora)
    ids, e = np.asarray(ids), f["emb"]["embedding"]
    h = p["emb"]["embedding"][ids] + (10.0 / 5) * e["a"][ids] @ e["b"]
    return h @ p["fc"]["kernel"] + p["fc"]["bias"] + (h @ f["fc"]["a"]) @ f["fc"]["b"]


def test_weight_path_patterns_linen_and_nnx():
    """A non-Dense layer's factors sit at its weight path (``emb/embedding``): keys match it."""
    cfg = LoraConfig(
        rank=2,
        targets=["emb/embedding", "fc"],
        rank_pattern={"embedding": 5},
        alpha_pattern={"emb/embedding": 10.0},
    )
    ids = jnp.array([[1, 7, 3]])
    wrapped = jax_lora.wrap(_EmbedMLP(), cfg)
    v = wrapped.init(jax.random.key(0), ids)
    assert jax.tree.map(np.shape, v["lora"]) == {
        "emb": {"embedding": {"a": (10, 5), "b": (5, 6)}},
        "fc": {"a": (6, 2), "b": (2, 4)},
    }
    lora = {
        "emb": {"embedding": _random_lora({"e": {"a": (10, 5), "b": (5, 6)}})["e"]},
        "fc": _random_lora({"f": {"a": (6, 2), "b": (2, 4)}}, seed=2)["f"],
    }
    assert_close(
        wrapped.apply({"params": v["params"], "lora": lora}, ids),
        _by_hand(v["params"], lora, ids),
        1e-5,
    )

    class NnxEmbedMLP(nnx.Module):
        def __init__(self, rngs):
            self.emb, self.fc = nnx.Embed(10, 6, rngs=rngs), nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, ids):
            return self.fc(self.emb(ids))

    model = jax_lora.wrap(NnxEmbedMLP(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    assert jax.tree.map(np.shape, jax_lora.lora_state(model)) == jax.tree.map(np.shape, lora)
    jax_lora.load_lora(model, lora)
    p = {
        "emb": {"embedding": model.emb.embedding[...]},
        "fc": {"kernel": model.fc.kernel[...], "bias": model.fc.bias[...]},
    }
    want = _by_hand(p, lora, ids)
    assert_close(model(ids), want, 1e-5)
    assert_close(jax_lora.merge(model)(ids), want, 1e-5)


@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_pattern_matching_no_layer_is_an_error_naming_it(field):
    cfg = LoraConfig(rank=2, targets=["fc1", "fc2"], **{field: {"fc3": 4}})
    with pytest.raises(
        ValueError, match=rf"(?s)`{field}` key 'fc3' matches no adapted layer.*  fc1\n  fc2"
    ):
        jax_lora.wrap(MLP(), cfg).init(jax.random.key(0), jnp.ones((1, 8)))
    model = NnxTwo(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match=rf"`{field}` key 'fc3' matches no adapted layer"):
        jax_lora.wrap(model, cfg)
    # a refused wrap leaves the model as it was
    assert jax.tree.map(np.shape, nnx.state(model)) == jax.tree.map(np.shape, before)
    assert not jax_lora.lora_state(model)
    # a pattern naming a layer that `targets` leaves out matches no *adapted* layer
    cfg = LoraConfig(rank=2, targets=["fc1"], **{field: {"fc2": 4}})
    with pytest.raises(ValueError, match=rf"`{field}` key 'fc2' matches no adapted layer"):
        jax_lora.wrap(MLP(), cfg).init(jax.random.key(0), jnp.ones((1, 8)))


class NnxTwo(nnx.Module):
    def __init__(self, rngs):
        self.fc1, self.fc2 = nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.fc1(x))


def test_merge_refuses_factors_of_another_rank():
    wrapped = jax_lora.wrap(MLP(), MIXED)
    v = wrapped.init(jax.random.key(1), jnp.ones((1, 8)))
    plain = LoraConfig(rank=4, alpha=8, targets=["fc1", "fc2", "head"])
    with pytest.raises(ValueError, match="factors at 'fc2' have rank 2 .* rank there is 4"):
        jax_lora.merge(v, plain)


def test_checkpoint_config_round_trips_patterns(tmp_path):
    raw = config_to_json(MIXED)
    assert raw["rank_pattern"] == {"fc2": 2, "^head": 1}
    assert config_from_json(json.loads(json.dumps(raw))) == MIXED
    old = {k: v for k, v in raw.items() if k not in ("rank_pattern", "alpha_pattern")}
    old["format"] = "jax_lora.adapter/1"  # saved before the patterns existed
    assert config_from_json(old) == LoraConfig(rank=4, alpha=8, targets=["fc1", "fc2", "head"])
    with pytest.raises(ValueError, match="`rank_pattern`"):
        config_from_json({**raw, "rank_pattern": {"fc2": "2"}})
    wrapped = jax_lora.wrap(MLP(), MIXED)
    lora = wrapped.init(jax.random.key(1), jnp.ones((1, 8)))["lora"]
    with jax_lora.AdapterCheckpointer(tmp_path) as ckpt:
        ckpt.save(3, lora, MIXED)
        ckpt.wait()
        restored = ckpt.restore(lora)
    assert restored.config == MIXED
    assert jax.tree.map(np.shape, restored.lora) == jax.tree.map(np.shape, lora)


def test_peft_export_import_round_trip_with_patterns(tmp_path):
    wrapped = jax_lora.wrap(MLP(), MIXED)
    shapes = jax.tree.map(np.shape, wrapped.init(jax.random.key(1), jnp.ones((1, 8)))["lora"])
    lora = _random_lora(shapes)
    jax_lora.export_peft(tmp_path / "a", lora, MIXED, torch_name=lambda p: f"model.{p}")
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (raw["r"], raw["lora_alpha"]) == (4, 8.0)
    assert raw["rank_pattern"] == {r"^model\.fc2": 2, r"^model\.head": 1}
    assert raw["alpha_pattern"] == {r"^model\.fc1": 2.0}
    back, cfg = jax_lora.import_peft(tmp_path / "a", flax_path=lambda n: n[len("model.") :])
    assert jax.tree.map(np.shape, back) == shapes
    assert_close(back, lora, 0.0)
    assert [(cfg.rank_for(n), cfg.scale_for(n)) for n in ("fc1", "fc2", "head")] == [
        MIXED_LAYERS[n] for n in ("fc1", "fc2", "head")
    ]
    x = jax.random.normal(jax.random.key(0), (3, 8))
    params = wrapped.init(jax.random.key(1), x)["params"]
    assert_close(
        jax_lora.wrap(MLP(), cfg).apply({"params": params, "lora": back}, x),
        _mlp_by_hand(params, lora, x),
        1e-5,
    )


def test_peft_import_checks_ranks_against_rank_pattern(tmp_path):
    wrapped = jax_lora.wrap(MLP(), MIXED)
    lora = wrapped.init(jax.random.key(1), jnp.ones((1, 8)))["lora"]
    jax_lora.export_peft(tmp_path, lora, MIXED)
    where = tmp_path / "adapter_config.json"
    raw = json.loads(where.read_text())
    where.write_text(json.dumps({**raw, "rank_pattern": {"fc2": 3}}))
    with pytest.raises(ValueError, match=r"`rank_pattern` \(rank 3 for 'fc2'\) does not fit"):
        jax_lora.import_peft(tmp_path)
    where.write_text(json.dumps({**raw, "rank_pattern": {"fc2": "2"}}))
    with pytest.raises(ValueError, match=r"`rank_pattern`=\{'fc2': '2'\}; expected an object"):
        jax_lora.import_peft(tmp_path)


# --- LoRA+ ---------------------------------------------------------------------------------


def _sgd_update(tx, tree, grads):
    return tx.update(grads, tx.init(tree), tree)[0]


def test_loraplus_linen_groups_learning_rates():
    """One SGD step: a at lr, b at ratio*lr, embedding factors at loraplus_lr_embedding, 1-D
    also_train params (biases) at ratio*lr as PEFT's groupB, 2-D ones at lr, the rest frozen."""
    cfg = LoraConfig(rank=2, targets=["emb/embedding", "fc"])
    v = jax_lora.wrap(_EmbedMLP(), cfg).init(jax.random.key(0), jnp.array([[1, 2]]))
    grads = jax.tree.map(lambda t: jnp.full(t.shape, 2.0, t.dtype), v)
    tx = jax_lora.optimizer(
        optax.sgd,
        learning_rate=0.1,
        loraplus_lr_ratio=16.0,
        loraplus_lr_embedding=1e-3,
        also_train="fc/.*",
    )
    u = _sgd_update(tx, v, grads)
    want = {
        "params": {
            "emb": {"embedding": 0.0},
            "fc": {"kernel": -0.1 * 2, "bias": -1.6 * 2},
        },
        "lora": {
            "emb": {"embedding": {"a": -1e-3 * 2, "b": -1e-3 * 2}},
            "fc": {"a": -0.1 * 2, "b": -1.6 * 2},
        },
    }
    got = jax.tree.map(lambda t: float(np.unique(np.asarray(t)).item()), u)
    assert jax.tree.map(lambda g, w: abs(g - w) < 1e-6 * max(1, abs(w)), got, want) == (
        jax.tree.map(lambda _: True, want)
    ), got


def test_loraplus_nnx_state_groups_learning_rates():
    model = jax_lora.wrap(NnxTwo(nnx.Rngs(0)), LoraConfig(rank=2), rngs=nnx.Rngs(1))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda t: jnp.full(t.shape, 2.0, t.dtype), params)
    tx = jax_lora.optimizer(optax.sgd, learning_rate=0.1, loraplus_lr_ratio=4.0)
    u = _sgd_update(tx, params, grads)
    flat = {
        "/".join(str(k.key) for k in path if hasattr(k, "key")): float(np.unique(x).item())
        for path, x in jax.tree_util.tree_flatten_with_path(u)[0]
    }
    want = {"fc1/lora_a": -0.2, "fc1/lora_b": -0.8, "fc1/kernel": 0.0, "fc1/bias": 0.0}
    assert {k: v for k, v in flat.items() if k.startswith("fc1/")} == pytest.approx(want), flat
    assert flat["fc2/lora_b"] == pytest.approx(-0.8)


def test_loraplus_nnx_optimizer_on_factors_only():
    """nnx.Optimizer(wrt=nnx.LoRAParam) hands plain arrays: grouped by name; a state holding
    other params as plain arrays is refused (they would train)."""
    model = jax_lora.wrap(NnxTwo(nnx.Rngs(0)), LoraConfig(rank=2), rngs=nnx.Rngs(1))
    tx = jax_lora.optimizer(optax.sgd, learning_rate=0.1, loraplus_lr_ratio=4.0)
    opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.LoRAParam))
    a0, b0, k0 = (
        np.asarray(t) for t in (model.fc1.lora_a[...], model.fc1.lora_b[...], model.fc1.kernel[...])
    )
    opt.update(model, grads)
    assert_close(np.asarray(model.fc1.lora_a[...]) - a0, np.full(a0.shape, -0.1), 1e-5)
    assert_close(np.asarray(model.fc1.lora_b[...]) - b0, np.full(b0.shape, -0.4), 1e-5)
    assert_close(model.fc1.kernel[...], k0, 0.0)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    with pytest.raises(ValueError, match="non-factor leaf 'fc1/bias'"):
        opt.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))


def test_loraplus_bad_arguments():
    with pytest.raises(TypeError, match="function of the learning rate"):
        jax_lora.optimizer(optax.adam(1e-3), loraplus_lr_ratio=16.0, learning_rate=1e-3)
    with pytest.raises(TypeError, match="needs `learning_rate`"):
        jax_lora.optimizer(optax.adam, loraplus_lr_ratio=16.0)
    with pytest.raises(ValueError, match="`loraplus_lr_ratio` must be a number > 0"):
        jax_lora.optimizer(optax.adam, loraplus_lr_ratio=-1.0, learning_rate=1e-3)
    with pytest.raises(TypeError, match="only used with `loraplus_lr_ratio`"):
        jax_lora.optimizer(optax.adam(1e-3), learning_rate=1e-3)


def test_loraplus_ratio_and_learning_rate_values():
    # bugs: a numpy ratio (np.float32(16), e.g. read from a config array) was refused as "not a
    # number > 0"; ratio inf and learning_rate NaN / <= 0 were accepted silently (inf/NaN
    # updates, or gradient ascent for a negative rate)
    for bad in (float("inf"), float("nan"), 0.0, -2.0):
        with pytest.raises(ValueError, match="`loraplus_lr_ratio` must be a number > 0 and finite"):
            jax_lora.optimizer(optax.sgd, loraplus_lr_ratio=bad, learning_rate=0.1)
    for bad in (float("nan"), float("inf"), 0.0, -0.1):
        with pytest.raises(ValueError, match="`learning_rate` must be a finite number > 0"):
            jax_lora.optimizer(optax.sgd, loraplus_lr_ratio=4.0, learning_rate=bad)
    cfg = LoraConfig(rank=2, targets="fc")
    v = jax_lora.wrap(_EmbedMLP(), cfg).init(jax.random.key(0), jnp.array([[1, 2]]))
    grads = jax.tree.map(lambda t: jnp.full(t.shape, 2.0, t.dtype), v)
    tx = jax_lora.optimizer(optax.sgd, loraplus_lr_ratio=np.float32(16), learning_rate=0.1)
    u = _sgd_update(tx, v, grads)
    np.testing.assert_allclose(u["lora"]["fc"]["a"], -0.2, rtol=1e-6)
    np.testing.assert_allclose(u["lora"]["fc"]["b"], -3.2, rtol=1e-6)


# --- PiSSA / OLoRA -------------------------------------------------------------------------

PLAIN = LoraConfig(rank=3, alpha=6, targets=["fc1", "fc2", "head"])


def _mlp_variables(config=PLAIN):
    wrapped = jax_lora.wrap(MLP(), config)
    x = jax.random.normal(jax.random.key(0), (3, 8))
    return wrapped, x, wrapped.init(jax.random.key(1), x)


def _top(w, r):
    """The best rank-r approximation of ``w`` (numpy SVD, float64)."""
    u, s, vt = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def test_pissa_factors_are_the_top_singular_part_and_the_output_is_unchanged():
    wrapped, x, v = _mlp_variables()
    lora, residual = jax_lora.init_from_weights(v, PLAIN, method="pissa")
    for n in ("fc1", "fc2", "head"):
        w, a, b = (np.asarray(t, np.float64) for t in (v["params"][n]["kernel"], *lora[n].values()))
        assert a.shape == (w.shape[0], 3) and b.shape == (3, w.shape[1])
        assert_close(PLAIN.scale * a @ b, _top(w, 3), 1e-5)
        assert_close(residual[n]["kernel"], w - _top(w, 3), 1e-5)
        assert_close(residual[n]["bias"], v["params"][n]["bias"], 0.0)
        # PEFT's split: A = sqrt(S/s) Uh and B = V sqrt(S/s) share the singular values evenly
        assert_close(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), 1e-5)
    assert_close(wrapped.apply({"params": residual, "lora": lora}, x), MLP().apply(v, x), 1e-5)
    assert not np.allclose(residual["fc1"]["kernel"], v["params"]["fc1"]["kernel"])


def test_olora_factors_are_the_qr_part():
    wrapped, x, v = _mlp_variables()
    lora, residual = jax_lora.init_from_weights(v, wrapped, x, method="olora")
    for n in ("fc1", "fc2", "head"):
        w = np.asarray(v["params"][n]["kernel"], np.float64)
        a, b = (np.asarray(t, np.float64) for t in (lora[n]["a"], lora[n]["b"]))
        q, r = np.linalg.qr(w.T)  # PEFT: qr of torch's (out, in) weight; B = Q[:, :r], A = R[:r]
        assert_close(b @ b.T, np.eye(3), 1e-5)  # orthonormal rows of Q^T
        assert_close(np.triu(a.T), a.T, 0.0)  # rows of R: upper triangular
        assert_close(np.abs(a.T), np.abs(r[:3]), 1e-5)
        assert_close(np.abs(b.T), np.abs(q[:, :3]), 1e-5)
        assert_close(residual[n]["kernel"], w - PLAIN.scale * a @ b, 1e-5)
    assert_close(wrapped.apply({"params": residual, "lora": lora}, x), MLP().apply(v, x), 1e-5)


def test_pissa_randomised_svd_finds_the_top_subspace():
    _, _, v = _mlp_variables()
    g = np.random.default_rng(0)
    u, vt = np.linalg.qr(g.normal(size=(16, 16)))[0], np.linalg.qr(g.normal(size=(16, 16)))[0]
    s = np.where(np.arange(16) < 3, [4.0, 3.0, 2.0] + [0.0] * 13, 0.01)
    w = ((u * s) @ vt.T).astype(np.float32)
    v = {
        "params": {**v["params"], "fc2": {**v["params"]["fc2"], "kernel": jnp.asarray(w)}},
        "lora": v["lora"],
    }
    lora, residual = jax_lora.init_from_weights(v, PLAIN, niter=2, key=jax.random.key(5))
    f = jax.tree.map(lambda t: np.asarray(t, np.float64), lora["fc2"])
    assert_close(PLAIN.scale * f["a"] @ f["b"], _top(w, 3), 1e-5)
    assert_close(residual["fc2"]["kernel"], w - _top(w, 3), 1e-4)


def test_init_from_weights_bad_inputs():
    _, _, v = _mlp_variables()
    quantized = {
        **v["params"],
        "fc2": {**v["params"]["fc2"], "kernel": jnp.ones((16, 16), jnp.int8)},
    }
    with pytest.raises(TypeError, match="weight at 'fc2' is int8, not a floating array"):
        jax_lora.init_from_weights({"params": quantized, "lora": v["lora"]}, PLAIN)
    with pytest.raises(ValueError, match="`method` must be one of"):
        jax_lora.init_from_weights(v, PLAIN, method="loftq")
    with pytest.raises(ValueError, match="`niter`.* for method='pissa' only"):
        jax_lora.init_from_weights(v, PLAIN, method="olora", niter=2)
    with pytest.raises(ValueError, match="needs a `key`"):
        jax_lora.init_from_weights(v, PLAIN, niter=2)
    with pytest.raises(ValueError, match="factors at 'fc1' have rank 3, but the config's rank"):
        jax_lora.init_from_weights(v, LoraConfig(rank=2, targets=["fc1", "fc2", "head"]))


@pytest.mark.parametrize("rslora", [False, True])
def test_convert_to_lora_gives_the_trained_model_on_the_original_base(rslora):
    config = LoraConfig(
        rank=3,
        alpha=6,
        targets=["fc1", "fc2", "head"],
        rslora=rslora,
        rank_pattern={"fc2": 2},
        alpha_pattern={"head": 4.0},
    )
    wrapped, x, v = _mlp_variables(config)
    lora0, residual = jax_lora.init_from_weights(v, config, method="pissa")
    trained = jax.tree.map(lambda t: t + 0.1, lora0)  # "training"
    want = wrapped.apply({"params": residual, "lora": trained}, x)
    plain, plain_cfg = jax_lora.convert_to_lora(trained, lora0, config)
    assert jax.tree.map(np.shape, plain) == {
        "fc1": {"a": (8, 6), "b": (6, 16)},
        "fc2": {"a": (16, 4), "b": (4, 16)},
        "head": {"a": (16, 6), "b": (6, 4)},
    }
    assert (plain_cfg.rank, plain_cfg.rank_pattern) == (6, (("fc2", 4),))
    assert plain_cfg.alpha == pytest.approx(6 * (np.sqrt(2) if rslora else 2))
    for n in ("fc1", "fc2", "head"):
        assert plain_cfg.scale_for(n) == pytest.approx(config.scale_for(n))
    got = jax_lora.wrap(MLP(), plain_cfg).apply({"params": v["params"], "lora": plain}, x)
    assert_close(got, want, 1e-5)
    with pytest.raises(ValueError, match="different layers"):
        jax_lora.convert_to_lora(trained, {"fc1": lora0["fc1"]}, config)


@pytest.mark.parametrize("method", ["pissa", "olora"])
def test_nnx_init_from_weights_in_place(method):
    """NNX: the same factors and residual as linen on the same weights, set in place; a Linear
    and an Embed (a weight-path adapter) with a per-weight alpha."""

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.emb, self.fc = nnx.Embed(10, 6, rngs=rngs), nnx.Linear(6, 4, rngs=rngs)

        def __call__(self, ids):
            return self.fc(self.emb(ids))

    cfg = LoraConfig(rank=2, targets=["emb/embedding", "fc"], alpha_pattern={"embedding": 6.0})
    model = jax_lora.wrap(Net(nnx.Rngs(0)), cfg, rngs=nnx.Rngs(1))
    ids = jnp.array([[1, 7, 3]])
    before = {
        "emb": {"embedding": np.asarray(model.emb.embedding[...])},
        "fc": {"kernel": np.asarray(model.fc.kernel[...]), "bias": np.asarray(model.fc.bias[...])},
    }
    with jax_lora.disabled():
        y0 = model(ids)
    lora, none = jax_lora.init_from_weights(model, method=method)
    assert none is None
    assert_close(model(ids), y0, 1e-5)  # residual + factors = the base model
    # the linen path on the same weights gives the same factors and residual
    v = jax_lora.wrap(_EmbedMLP(), cfg).init(jax.random.key(0), ids)
    v = {"params": before, "lora": v["lora"]}
    want_lora, want_params = jax_lora.init_from_weights(v, cfg, method=method)
    assert_close(lora, want_lora, 1e-6)
    assert_close(model.emb.embedding[...], want_params["emb"]["embedding"], 1e-6)
    assert_close(model.fc.kernel[...], want_params["fc"]["kernel"], 1e-6)
    e = jax.tree.map(lambda t: np.asarray(t, np.float64), lora["emb"]["embedding"])
    if method == "pissa":
        assert_close(3.0 * e["a"] @ e["b"], _top(before["emb"]["embedding"], 2), 1e-5)


def test_convert_to_lora_square_layer_at_full_rank():
    # bug: a (4, 4), b (4, 4) (a 4x4 kernel at rank 4) read as a stack of 4 layers: b's rank
    # axis was taken to be axis 1, so the converted b was concatenated along the output axis
    cfg = LoraConfig(rank=4, alpha=4)
    wrapped = jax_lora.wrap(nn.Dense(4), cfg)
    x = jax.random.normal(jax.random.key(0), (3, 4))
    v = wrapped.init(jax.random.key(1), x)
    lora0, residual = jax_lora.init_from_weights(v, cfg, method="olora")
    trained = jax.tree.map(lambda t: t + 0.1, lora0)
    want = wrapped.apply({"params": residual, "lora": trained}, x)
    lora, cfg2 = jax_lora.convert_to_lora(trained, lora0, cfg)
    assert lora["a"].shape == (4, 8) and lora["b"].shape == (8, 4)
    got = jax_lora.wrap(nn.Dense(4), cfg2).apply({"params": v["params"], "lora": lora}, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
