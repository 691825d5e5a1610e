"""DoRA (`jax_lora.dora`, ``LoraConfig(use_dora=True)``) against independent computations:
the base model run with each kernel replaced by ``m / ‖W + s·a@b‖ · (W + s·a@b)`` (numpy)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from _models import MLP, Encoder
from flax import nnx

import jax_lora
from jax_lora import LoraConfig, dora

KEY = jax.random.key(0)


def _x(shape=(2, 5, 16), seed=1):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _randomize(lora, seed=7):
    """Random a, b (std 0.3) and m = init * (1 + 0.2 noise): every term of the formula matters."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, (path, t) in zip(keys, leaves, strict=True):
        noise = jax.random.normal(k, t.shape, t.dtype)
        if jax.tree_util.keystr(path[-1:]) == "['m']":
            out.append(t * (1 + 0.2 * noise))
        else:
            out.append(0.3 * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


def _np_merge(params, lora, scale):
    """numpy float64: each adapted kernel -> m / ‖W + s·a@b‖_in · (W + s·a@b)."""
    out = jax.tree.map(lambda v: np.asarray(v, np.float64), params)

    def visit(p, node):
        if "m" in node:
            a, b, m = (np.asarray(node[k], np.float64) for k in ("a", "b", "m"))
            n_in = a.ndim - 1
            full = p["kernel"] + scale * np.tensordot(a, b, axes=([n_in], [0]))
            norm = np.sqrt((full**2).sum(axis=tuple(range(n_in))))
            p["kernel"] = m / norm * full
            return
        for k, v in node.items():
            visit(p[k], v)

    visit(out, lora)
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), out)


MODELS = {
    "mlp": (MLP(), (4, 16), 2.0),  # Dense
    "encoder": (Encoder(layers=1), (2, 5, 16), 0.5),  # DenseGeneral (attention) and Einsum (MLP)
}


@pytest.mark.parametrize(("name", "jit"), [("mlp", False), ("mlp", True), ("encoder", True)])
def test_forward_equals_merged_formula(name, jit):
    base, shape, alpha = MODELS[name]
    cfg = LoraConfig(rank=2, alpha=alpha, use_dora=True)
    wrapped, x = jax_lora.wrap(base, cfg), _x(shape)
    v = wrapped.init(KEY, x)
    v = {"params": v["params"], "lora": _randomize(v["lora"])}
    run = jax.jit(wrapped.apply) if jit else wrapped.apply
    want = base.apply({"params": _np_merge(v["params"], v["lora"], cfg.scale)}, x)
    assert_close(run(v, x), want, rel=1e-5)


def test_init_magnitude_is_column_norm_and_output_is_base():
    base, cfg = Encoder(), LoraConfig(rank=2, use_dora=True)
    wrapped, x = jax_lora.wrap(base, cfg), _x()
    v = wrapped.init(KEY, x)
    for path in (("layer_0", "attn", "query"), ("layer_0", "attn", "out"), ("layer_1", "up")):
        node, kern = v["lora"], v["params"]
        for k in path:
            node, kern = node[k], kern[k]
        k = np.asarray(kern["kernel"], np.float64)
        n_in = node["a"].ndim - 1
        want = np.sqrt((k**2).sum(axis=tuple(range(n_in))))
        assert node["m"].shape == k.shape[n_in:] and node["m"].dtype == jnp.float32
        assert_close(node["m"], want, rel=1e-6)
    assert_close(wrapped.apply(v, x), base.apply({"params": v["params"]}, x), rel=1e-5)


def test_grads_treat_the_norm_as_a_constant():
    """Gradients wrt a, b, m equal those of the base model run with the merged kernel whose
    norm is stop_gradient'ed (PEFT's ``weight_norm.detach()``), and differ without it."""
    base, cfg = Encoder(layers=1), LoraConfig(rank=2, alpha=4.0, use_dora=True)
    wrapped, x = jax_lora.wrap(base, cfg), _x()
    v = wrapped.init(KEY, x)
    params, lora = v["params"], _randomize(v["lora"])
    target = _x((2, 5, 8), seed=3)

    def merged(lora, detach):
        out = jax.tree.map(lambda t: t, params)

        def visit(p, node):
            if "m" in node:
                a, b, m = node["a"], node["b"], node["m"]
                n_in = a.ndim - 1
                full = p["kernel"] + cfg.scale * jnp.tensordot(
                    a, b, axes=([n_in], [0]), precision="highest"
                )
                norm = jnp.sqrt(jnp.sum(full**2, axis=tuple(range(n_in))))
                f = m / (jax.lax.stop_gradient(norm) if detach else norm)
                p["kernel"] = f.reshape((1,) * n_in + f.shape) * full
                return
            for k, val in node.items():
                visit(p[k], val)

        visit(out, lora)
        return out

    loss = lambda y: jnp.mean((y - target) ** 2)  # noqa: E731
    got = jax.jit(jax.grad(lambda lo: loss(wrapped.apply({"params": params, "lora": lo}, x))))(lora)
    want = jax.jit(jax.grad(lambda lo: loss(base.apply({"params": merged(lo, True)}, x))))(lora)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, rel=1e-4)
    full = jax.jit(jax.grad(lambda lo: loss(base.apply({"params": merged(lo, False)}, x))))(lora)
    diff = max(
        float(jnp.max(jnp.abs(g - w)))
        for g, w in zip(*map(jax.tree.leaves, (got, full)), strict=True)
    )
    assert diff > 1e-3  # the test tells the detached norm from the full gradient


def test_dropout_scales_the_dropped_out_base_as_peft(monkeypatch):
    """PEFT with dropout running: ``y = xW + bias + (m/n - 1)·dropout(x)W + (m/n)·s·dropout(x)AB``."""
    mask = (jax.random.uniform(jax.random.key(5), (4, 8)) > 0.3).astype(jnp.float32)
    monkeypatch.setattr(jax_lora.factors, "dropout", lambda x, rate, key: x * mask / 0.7)
    dense = nn.Dense(6, bias_init=nn.initializers.normal(1.0))
    cfg = LoraConfig(rank=2, alpha=3.0, dropout=0.3, use_dora=True)
    wrapped, x = jax_lora.wrap(dense, cfg), _x((4, 8))
    v = wrapped.init(KEY, x)
    v = {"params": v["params"], "lora": _randomize(v["lora"])}
    got = wrapped.apply(v, x, rngs={"dropout": jax.random.key(1)})
    w, bias = (np.asarray(v["params"][k], np.float64) for k in ("kernel", "bias"))
    a, b, m = (np.asarray(v["lora"][k], np.float64) for k in ("a", "b", "m"))
    xs, xd = np.asarray(x, np.float64), np.asarray(x * mask / 0.7, np.float64)
    n = np.linalg.norm(w + cfg.scale * a @ b, axis=0)
    want = xs @ w + bias + (m / n - 1) * (xd @ w) + (m / n) * cfg.scale * (xd @ a @ b)
    assert_close(got, want, rel=1e-5)
    # evaluation: no dropout, the merged formula
    ev = wrapped.apply(v, x)
    assert_close(ev, xs @ (m / n * (w + cfg.scale * a @ b)) + bias, rel=1e-5)


def test_norm_without_forming_delta_equals_direct_form():
    k = jax.random.split(jax.random.key(2), 3)
    kernel = jax.random.normal(k[0], (3, 6, 5, 7))  # lead 3, in (6, 5), out 7
    a = jax.random.normal(k[1], (3, 6, 5, 4))
    b = jax.random.normal(k[2], (3, 4, 7))
    got = dora.weight_norm(kernel, a, b, 0.7)
    full = np.asarray(kernel, np.float64) + 0.7 * np.einsum(
        "lijr,lro->lijo", np.asarray(a, np.float64), np.asarray(b, np.float64)
    )
    want = np.sqrt((full**2).sum(axis=(1, 2)))
    assert got.shape == (3, 7)
    assert_close(got, want, rel=1e-5)
    assert_close(dora.weight_norm_factored(kernel, a, b, 0.7), want, rel=1e-5)
    # a constant in backprop
    g = jax.grad(lambda a: jnp.sum(dora.weight_norm(kernel, a, b, 0.7)))(a)
    assert float(jnp.max(jnp.abs(g))) == 0.0


def test_use_dora_must_be_bool():
    with pytest.raises(TypeError, match="`use_dora` must be a bool"):
        LoraConfig(rank=2, use_dora="yes")
    assert LoraConfig(rank=2).use_dora is False


def test_merge_folds_magnitude_and_unmerge_explains():
    base, cfg = Encoder(), LoraConfig(rank=2, alpha=4.0, use_dora=True)
    wrapped, x = jax_lora.wrap(base, cfg), _x()
    v = wrapped.init(KEY, x)
    v = {"params": v["params"], "lora": _randomize(v["lora"])}
    merged = jax_lora.merge(v, cfg)
    assert_close(merged, _np_merge(v["params"], v["lora"], cfg.scale), rel=1e-5)
    assert_close(base.apply({"params": merged}, x), wrapped.apply(v, x), rel=1e-5)
    with pytest.raises(ValueError, match=r"'layer_0/attn/\w+' is DoRA .* cannot be undone"):
        jax_lora.unmerge({"params": merged, "lora": v["lora"]}, cfg)
    # the documented way back: the norm of the unmerged kernel
    node, w = v["lora"]["layer_1"]["up"], v["params"]["layer_1"]["up"]["kernel"]
    norm = dora.weight_norm(w, node["a"], node["b"], cfg.scale)
    back = dora.unmerge_kernel(
        merged["layer_1"]["up"]["kernel"], node["a"], node["b"], node["m"], norm, cfg.scale
    )
    assert_close(back, w, rel=1e-5)


def _dora_lora():
    cfg = LoraConfig(rank=2, alpha=4.0, use_dora=True)
    v = jax_lora.wrap(Encoder(), cfg).init(KEY, _x())
    return _randomize(v["lora"]), cfg


def test_peft_format_round_trip_with_magnitude(tmp_path):
    from safetensors.numpy import load_file

    lora, cfg = _dora_lora()
    names = jax_lora.export_peft(tmp_path, lora, cfg)
    t = load_file(tmp_path / "adapter_model.safetensors")
    m = t["base_model.model.layer_0.attn.query.lora_magnitude_vector"]
    assert m.shape == (16,)  # DenseGeneral (heads, head_dim) flattened, as torch sees it
    assert len([k for k in t if k.endswith("lora_magnitude_vector")]) == len(names)
    back, cfg2 = jax_lora.import_peft(tmp_path, like=lora)
    assert cfg2.use_dora and cfg2.rank == 2 and cfg2.scale == cfg.scale
    assert jax.tree.structure(back) == jax.tree.structure(lora)
    for g, w in zip(jax.tree.leaves(back), jax.tree.leaves(lora), strict=True):
        np.testing.assert_array_equal(g, w)
    # a stack of L layers exports L modules, each with its own magnitude
    stack = {
        "blocks": {"fc": {"a": np.ones((3, 8, 2)), "b": np.ones((3, 2, 5)), "m": np.ones((3, 5))}}
    }
    stack["blocks"]["fc"]["m"][1] = 2.0
    jax_lora.export_peft(tmp_path / "s", stack, cfg, stacked={"blocks": "h/{i}"})
    t = load_file(tmp_path / "s" / "adapter_model.safetensors")
    assert t["base_model.model.h.1.fc.lora_magnitude_vector"].tolist() == [2.0] * 5
    back, _ = jax_lora.import_peft(tmp_path / "s", stacked={"blocks": "h/{i}"})
    np.testing.assert_array_equal(back["blocks"]["fc"]["m"], stack["blocks"]["fc"]["m"])


def test_peft_format_dora_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    lora, cfg = _dora_lora()
    with pytest.raises(ValueError, match=r"'layer_0/attn/key' has a DoRA magnitude 'm', but"):
        jax_lora.export_peft(tmp_path / "x", lora, LoraConfig(rank=2, alpha=4.0))
    assert not (tmp_path / "x").exists()
    jax_lora.export_peft(tmp_path, lora, cfg)
    f = tmp_path / "adapter_model.safetensors"
    t = load_file(f)
    key = "base_model.model.layer_1.up.lora_magnitude_vector"
    save_file({**t, key: np.ones((3,), np.float32)}, f)
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(3,\) .* \(32,\)"):
        jax_lora.import_peft(tmp_path)
    del t[key]
    save_file(t, f)
    with pytest.raises(
        ValueError, match="'layer_1.up' has no lora_magnitude_vector, but `use_dora`"
    ):
        jax_lora.import_peft(tmp_path)


def test_checkpoint_round_trip_and_param_report(tmp_path):
    lora, cfg = _dora_lora()
    with jax_lora.AdapterCheckpointer(tmp_path) as ck:
        ck.save(1, lora, cfg)
        ck.wait()
        r = ck.restore(lora)
    assert r.config == cfg and r.config.use_dora
    for g, w in zip(jax.tree.leaves(r.lora), jax.tree.leaves(lora), strict=True):
        np.testing.assert_array_equal(g, w)
    assert r.lora["layer_1"]["up"]["m"].shape == (2, 16)
    # Dense(16) on 8 inputs, rank 4: a 8*4 + b 4*16 + m 16 trainable; kernel 8*16 + bias 16
    model = jax_lora.wrap(nn.Dense(16), LoraConfig(rank=4, use_dora=True))
    rep = jax_lora.param_report(model.init(KEY, jnp.ones((1, 8))))
    assert (rep.trainable, rep.total) == (112, 112 + 144)


# --- NNX ----------------------------------------------------------------------------------


class _NnxMLP(nnx.Module):
    """tests/_models.MLP in NNX: 16 -> 16 -> 16 -> 4."""

    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.head = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class _Heads(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
        self.up = nnx.Einsum("btd,dnf->btnf", (16, 2, 8), bias_shape=(2, 8), rngs=rngs)
        self.out = nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return self.out(self.q(x) * self.up(x))


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_nnx_equals_linen(dropout, monkeypatch):
    mask = (jax.random.uniform(jax.random.key(5), (8, 16)) > 0.25).astype(jnp.float32)
    monkeypatch.setattr(jax_lora.factors, "dropout", lambda x, rate, key: x * mask / 0.75)
    cfg = LoraConfig(rank=4, alpha=6.0, targets=["fc1", "fc2", "head"], dropout=dropout)
    cfg = dataclasses.replace(cfg, use_dora=True)
    x = jax.random.normal(jax.random.key(1), (8, 16))
    wrapped = jax_lora.wrap(MLP(), cfg)
    v = wrapped.init(KEY, x)
    model = jax_lora.wrap(_NnxMLP(nnx.Rngs(0)), cfg)
    for name in ("fc1", "fc2", "head"):
        layer = getattr(model, name)
        layer.kernel[...] = v["params"][name]["kernel"]
        layer.bias[...] = v["params"][name]["bias"]
        assert layer.lora_m.shape == (layer.out_features,)
    # a fresh NNX magnitude is ‖W‖ of the NNX layer's own kernel, as linen's of its own
    assert_close(
        _fresh_nnx_m(cfg), np.linalg.norm(np.asarray(_NnxMLP(nnx.Rngs(0)).fc1.kernel[...]), axis=0)
    )
    v["lora"] = _randomize(v["lora"])
    jax_lora.load_lora(model, v["lora"])
    assert_close(jax_lora.lora_state(model), v["lora"], rel=0)
    kw = {"rngs": {"dropout": jax.random.key(1)}} if dropout else {}
    if not dropout:
        model = nnx.view(model, deterministic=True)
    want = wrapped.apply(v, x, **kw)
    assert_close(model(x), want, rel=1e-6)
    g_nnx = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    g_linen = jax.grad(
        lambda lo: jnp.sum(wrapped.apply({"params": v["params"], "lora": lo}, x, **kw) ** 2)
    )(v["lora"])
    for name in ("fc1", "fc2", "head"):
        for ours, theirs in (("lora_a", "a"), ("lora_b", "b"), ("lora_m", "m")):
            assert_close(g_nnx[name][ours][...], g_linen[name][theirs], rel=1e-5)


def _fresh_nnx_m(cfg):
    return jax_lora.wrap(_NnxMLP(nnx.Rngs(0)), cfg).fc1.lora_m[...]


def test_nnx_merge_unmerge_multi_axis():
    base = _Heads(nnx.Rngs(0))
    kernels = {n: getattr(base, n).kernel[...] for n in ("q", "up", "out")}
    model = jax_lora.wrap(base, LoraConfig(rank=3, use_dora=True), rngs=nnx.Rngs(5))
    state = jax_lora.lora_state(model)
    assert jax.tree.map(jnp.shape, state)["out"] == {"a": (2, 8, 3), "b": (3, 16), "m": (16,)}
    assert jax.tree.map(jnp.shape, state)["up"]["m"] == (2, 8)
    rep = jax_lora.param_report(model)  # a, b and m of q, up, out are the trainable params
    assert rep.trainable == sum(int(np.size(t)) for t in jax.tree.leaves(state))
    assert rep.trainable == (16 * 3 + 3 * 16 + 16) * 2 + (16 * 3 + 3 * 16 + 16)
    lora = _randomize(state)
    jax_lora.load_lora(model, lora)
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    merged = jax_lora.merge(model)
    assert not jax_lora.nnx.adapted_layers(merged)
    assert_close(merged(x), model(x), rel=1e-5)
    want = _np_merge({n: {"kernel": k} for n, k in kernels.items()}, lora, 1.0)
    for n in kernels:
        assert_close(getattr(merged, n).kernel[...], want[n]["kernel"], rel=1e-5)
    back = jax_lora.unmerge(merged, model)
    for n, k in kernels.items():
        assert_close(getattr(back, n).kernel[...], k, rel=1e-5)


def test_backward_keeps_no_kernel_sized_residual(capsys):
    """The norm is a constant: the backward keeps its (out,) result, never W + s·a@b."""
    import jax.ad_checkpoint

    k = jax.random.split(jax.random.key(4), 4)
    w, a = jax.random.normal(k[0], (24, 40)), jax.random.normal(k[1], (24, 3))
    b, x = jax.random.normal(k[2], (3, 40)), jax.random.normal(k[3], (5, 24))
    geom = jax_lora.factors.dense_geometry(x.shape, 40)

    def loss(a, b, m):
        return jnp.sum(dora.apply(x @ w, None, x, None, w, a, b, m, geom, 0.5))

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, a, b, jnp.ones((40,)))
    saved = capsys.readouterr().out
    assert "f32[40] output of sqrt" in saved  # the norm itself
    assert "f32[24,40]" not in saved, saved


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return x + nn.Dense(16, name="fc2")(nn.gelu(nn.Dense(32, name="fc1")(x))), None


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            nn.remat(_Block),
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            length=3,
        )
        return stack(name="blocks")(x, None)[0]


class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = _Block(name=f"block_{i}")(x)[0]
        return x


def _unstack(tree):
    return {f"block_{i}": jax.tree.map(lambda t, i=i: t[i], tree["blocks"]) for i in range(3)}


def test_scanned_stack_equals_unrolled():
    """nn.scan (with remat) stacks the magnitude with the factors: m (L, out...); merge folds
    each layer's kernel with its own m."""
    cfg = LoraConfig(rank=4, alpha=8.0, use_dora=True)
    x = _x((2, 5, 16))
    scanned = jax_lora.wrap(Scanned(), cfg)
    v = scanned.init(KEY, x)
    assert v["lora"]["blocks"]["fc1"]["m"].shape == (3, 32)
    v["lora"] = _randomize(v["lora"])
    flat = {"params": _unstack(v["params"]), "lora": _unstack(v["lora"])}
    want = jax_lora.wrap(Unrolled(), cfg).apply(flat, x)
    assert_close(jax.jit(scanned.apply)(v, x), want, rel=1e-5)
    merged = jax_lora.merge(v, cfg)
    assert_close(Scanned().apply({"params": merged}, x), want, rel=1e-5)


def test_magnitude_inherits_partitioning():
    init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
    model = jax_lora.wrap(nn.Dense(16, kernel_init=init), LoraConfig(rank=2, use_dora=True))
    v = model.init(KEY, jnp.ones((2, 8)))
    assert v["lora"]["m"].names == ("mlp",) and v["lora"]["b"].names == (None, "mlp")
    assert v["lora"]["m"].value.shape == (16,)


def test_nnx_magnitude_inherits_partitioning():
    init = nnx.initializers.lecun_normal()
    with nnx.use_eager_sharding(False):
        model = _Heads(nnx.Rngs(0))
        model.q = nnx.LinearGeneral(
            16,
            (2, 8),
            kernel_init=nnx.with_partitioning(init, ("embed", "heads", "kv")),
            rngs=nnx.Rngs(0),
        )
        jax_lora.wrap(model, LoraConfig(rank=2, targets="q|up", use_dora=True))
    spec = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
    P = jax.sharding.PartitionSpec
    assert spec["q"]["lora_m"].get_value() == P("heads", "kv")
    assert spec["up"]["lora_m"].get_value() == P()


def test_dora_tree_and_config_must_agree():
    """A DoRA tree run (or merged) under a plain-LoRA config, or the reverse, raises naming the
    layer instead of silently dropping or missing the magnitude."""
    x = jnp.ones((2, 8))
    dora_cfg, plain = LoraConfig(rank=2, use_dora=True), LoraConfig(rank=2)
    v = jax_lora.wrap(nn.Dense(4, name="fc"), dora_cfg).init(KEY, x)
    with pytest.raises(ValueError, match=r"'m'.*`use_dora` is False"):
        jax_lora.wrap(nn.Dense(4), plain).apply(v, x)
    with pytest.raises(ValueError, match=r"'m'.*`use_dora` is False"):
        jax_lora.merge(v, plain)
    no_m = {"params": v["params"], "lora": {"a": v["lora"]["a"], "b": v["lora"]["b"]}}
    with pytest.raises(ValueError, match=r"no DoRA magnitude 'm'.*`use_dora=True`"):
        jax_lora.wrap(nn.Dense(4), dora_cfg).apply(no_m, x)
    with pytest.raises(ValueError, match=r"no DoRA magnitude 'm'.*`use_dora=True`"):
        jax_lora.merge(no_m, dora_cfg)


class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.fc(x))


class _NnxStack(nnx.Module):
    """3 blocks made under nnx.vmap, run with nnx.scan: kernels (3, 16, 16)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return _NnxBlock(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_nnx_scanned_stack():
    model = jax_lora.wrap(
        _NnxStack(nnx.Rngs(0)), LoraConfig(rank=2, use_dora=True), rngs=nnx.Rngs(1)
    )
    kernel = np.asarray(model.blocks.fc.kernel[...], np.float64)
    lora = jax_lora.lora_state(model)
    assert lora["blocks"]["fc"]["m"].shape == (3, 16)
    assert_close(lora["blocks"]["fc"]["m"], np.linalg.norm(kernel, axis=1), rel=1e-6)
    lora = _randomize(lora)
    jax_lora.load_lora(model, lora)
    x = jax.random.normal(jax.random.key(2), (4, 16))
    want = np.asarray(x, np.float64)
    bias = np.asarray(model.blocks.fc.bias[...], np.float64)
    for i in range(3):  # unrolled, each layer's kernel m_i (W_i + a_i b_i) / ||.||
        a, b, m = (np.asarray(lora["blocks"]["fc"][k][i], np.float64) for k in ("a", "b", "m"))
        full = kernel[i] + a @ b
        want = want + np.tanh(want @ (m / np.linalg.norm(full, axis=0) * full) + bias[i])
    assert_close(model(x), want, rel=1e-5)
    assert_close(jax_lora.merge(model)(x), want, rel=1e-5)


def test_einsum_with_permuted_output_axes():
    """Kernel out axes (n, f) appear in the output as (f, n): m and the bias follow the output."""
    base = nn.Einsum((16, 2, 8), "btd,dnf->bfnt", bias_init=nn.initializers.normal(1.0))
    cfg = LoraConfig(rank=2, alpha=3.0, use_dora=True)
    wrapped, x = jax_lora.wrap(base, cfg), _x()
    v = wrapped.init(KEY, x)
    assert v["lora"]["m"].shape == (2, 8) and v["params"]["bias"].shape == (8, 2)
    v = {"params": v["params"], "lora": _randomize(v["lora"])}
    want = base.apply({"params": _np_merge(v["params"], v["lora"], cfg.scale)}, x)
    assert_close(wrapped.apply(v, x), want, rel=1e-5)
