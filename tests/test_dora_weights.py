"""DoRA on non-Dense weights (`jax_lora.weights` path): Conv, Embed and a layer's own matmul
weight, linen and NNX, against independent computations: the base model run with the weight
replaced by ``m / ‖W + s·a@b‖ · (W + s·a@b)`` (numpy float64, the norm over the ``in`` axes)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import LoraConfig

KEY = jax.random.key(0)
SCALE = 2.0  # alpha 4 / rank 2


class Conv1DLike(nn.Module):
    """A layer with its own weight ``w: (out 6, in 4)`` used as ``x @ w.T`` (PEFT's Linear
    layout; GPT-2's Conv1D is the transpose)."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.5), (6, 4))
        return jnp.einsum("bi,oi->bo", x, w) + 1.0


class Model(nn.Module):
    @nn.compact
    def __call__(self, ids, img, x):
        e = nn.Embed(11, 6, name="emb")(ids)
        c = nn.Conv(5, (3, 3), name="conv")(img)
        c1 = nn.Conv(3, (2,), name="conv1d")(img[:, 0])
        return e, c, c1, Conv1DLike(name="own")(x)


# weight path in params -> the stored-axis indices of its `in` axes (the norm's axes)
INS = {("emb", "embedding"): (0,), ("conv", "kernel"): (0, 1, 2), ("conv1d", "kernel"): (0, 1)}
INS[("own", "w")] = (1,)
CFG = LoraConfig(rank=2, alpha=4.0, use_dora=True, targets=("emb", "conv", "conv1d", "own"))


def _inputs():
    ids = jnp.array([[1, 2, 3, 10], [0, 5, 5, 7]])
    img = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))
    x = jax.random.normal(jax.random.key(2), (3, 4))
    return ids, img, x


def _randomize(lora, seed=7):
    """Random a, b (std 0.3) and m = init * (1 + 0.2 noise): every term matters."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = []
    for k, (path, t) in zip(keys, leaves, strict=True):
        noise = jax.random.normal(k, t.shape, t.dtype)
        last = jax.tree_util.keystr(path[-1:])
        out.append(t * (1 + 0.2 * noise) if last == "['m']" else 0.3 * noise)
    return jax.tree_util.tree_unflatten(treedef, out)


def _np_dora(w, a, b, m, ins):
    """float64 ``m/‖W + s·a@b‖·(W + s·a@b)`` for a weight stored in any order (``ins`` its
    in axes; the others are out axes, in stored order)."""
    w, a, b, m = (np.asarray(t, np.float64) for t in (w, a, b, m))
    outs = [i for i in range(w.ndim) if i not in ins]
    d = np.tensordot(a, b, axes=([a.ndim - 1], [0]))  # (in..., out...)
    d = np.transpose(d, np.argsort(list(ins) + outs))
    full = w + SCALE * d
    norm = np.sqrt((full**2).sum(axis=ins, keepdims=True))
    return np.expand_dims(m, ins) / norm * full


def _np_merged(params, lora):
    out = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    for (layer, name), ins in INS.items():
        node = lora[layer][name]
        out[layer][name] = _np_dora(params[layer][name], node["a"], node["b"], node["m"], ins)
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), out)


@pytest.fixture(scope="module")
def linen_setup():
    wrapped = jax_lora.wrap(Model(), CFG)
    v = wrapped.init(KEY, *_inputs())
    return wrapped, {"params": v["params"], "lora": _randomize(v["lora"])}, v


def test_linen_tree_and_initial_magnitude(linen_setup):
    _, _, v0 = linen_setup
    shapes = jax.tree.map(jnp.shape, v0["lora"])
    assert shapes == {
        "emb": {"embedding": {"a": (11, 2), "b": (2, 6), "m": (6,)}},  # PEFT (embedding_dim,)
        "conv": {"kernel": {"a": (3, 3, 4, 2), "b": (2, 5), "m": (5,)}},  # PEFT (out_channels,)
        "conv1d": {"kernel": {"a": (2, 4, 2), "b": (2, 3), "m": (3,)}},
        "own": {"w": {"a": (4, 2), "b": (2, 6), "m": (6,)}},  # per output row of (out, in)
    }
    for (layer, name), ins in INS.items():  # b = 0: m = ‖W‖ over the in axes
        w = np.asarray(v0["params"][layer][name], np.float64)
        want = np.sqrt((w**2).sum(axis=ins))
        assert_close(v0["lora"][layer][name]["m"], want, 1e-6)


@pytest.mark.parametrize("jit", [False, True])
def test_linen_forward_vs_numpy(linen_setup, jit):
    wrapped, v, _ = linen_setup
    apply = jax.jit(wrapped.apply) if jit else wrapped.apply
    got = apply(v, *_inputs())
    want = Model().apply({"params": _np_merged(v["params"], v["lora"])}, *_inputs())
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape
        assert_close(g, w, 1e-5)


def test_linen_grads_norm_is_constant(linen_setup):
    """Gradients wrt a, b, m equal those of ``m/sg(‖W+s·a@b‖)·(W+s·a@b)`` (PEFT's detach)."""
    wrapped, v, _ = linen_setup
    ins = _inputs()

    def loss_ours(lora):
        outs = wrapped.apply({"params": v["params"], "lora": lora}, *ins)
        return sum(jnp.sum(jnp.sin(o)) for o in outs)

    def loss_ref(lora):
        p = dict(v["params"])
        for (layer, name), axes in INS.items():
            node, w = lora[layer][name], v["params"][layer][name]
            outs = [i for i in range(w.ndim) if i not in axes]
            d = jnp.tensordot(node["a"], node["b"], axes=([node["a"].ndim - 1], [0]))
            full = w + SCALE * jnp.transpose(d, tuple(np.argsort(list(axes) + outs)))
            norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(full**2, axis=axes, keepdims=True)))
            p[layer] = {**p[layer], name: jnp.expand_dims(node["m"], axes) / norm * full}
        outs = Model().apply({"params": p}, *ins)
        return sum(jnp.sum(jnp.sin(o)) for o in outs)

    got, want = jax.grad(loss_ours)(v["lora"]), jax.grad(loss_ref)(v["lora"])
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        assert float(jnp.abs(w).max()) > 1e-3, path  # each gradient is really exercised
        assert_close(g, w, 1e-4)


def test_linen_merge(linen_setup):
    _, v, _ = linen_setup
    merged = jax_lora.merge(v, CFG)
    want = _np_merged(v["params"], v["lora"])
    for (layer, name), _ in INS.items():
        assert_close(merged[layer][name], want[layer][name], 1e-5)
    with pytest.raises(ValueError, match="DoRA"):
        jax_lora.unmerge({"params": merged, "lora": v["lora"]}, CFG)


def test_linen_bad_magnitude_names_path(linen_setup):
    wrapped, v, _ = linen_setup
    lora = jax.tree.map(lambda t: t, v["lora"])
    lora["conv"]["kernel"]["m"] = jnp.ones((4,))
    with pytest.raises(ValueError, match=r"'conv/kernel'.*\(4,\).*\(5,\)"):
        wrapped.apply({"params": v["params"], "lora": lora}, *_inputs())


class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(11, 6, name="emb")
        return emb.attend(emb(ids))


def test_linen_tied_head_refused():
    wrapped = jax_lora.wrap(Tied(), dataclasses.replace(CFG, targets=("emb",)))
    with pytest.raises(ValueError, match=r"DoRA .*'emb/embedding'.*attend"):
        wrapped.init(KEY, jnp.array([[1, 2]]))


def _mask(x, rate, key):
    """A fixed dropout mask (same in linen and NNX): every 4th element dropped."""
    keep = (jnp.arange(x.size).reshape(x.shape) % 4 != 0).astype(x.dtype)
    return x * keep / jnp.asarray(1 - rate, x.dtype)


def test_linen_dropout_is_pefts(monkeypatch):
    """With dropout: ``y + (m/n - 1)·(drop(x) @ W) + (m/n)·s·(drop(x) @ a) @ b`` (PEFT's
    Linear/Conv dropout case), here for the (out, in) weight, in numpy."""
    monkeypatch.setattr(jax_lora.factors, "dropout", _mask)
    cfg = dataclasses.replace(CFG, targets=("w",), dropout=0.25)
    wrapped, x = jax_lora.wrap(Conv1DLike(), cfg), _inputs()[2]
    v = wrapped.init(KEY, x)
    v = {"params": v["params"], "lora": _randomize(v["lora"])}
    got = wrapped.apply(v, x, rngs={"dropout": jax.random.key(3)})
    w, node = np.asarray(v["params"]["w"], np.float64), v["lora"]["w"]
    a, b, m = (np.asarray(node[k], np.float64) for k in ("a", "b", "m"))
    xd = np.asarray(_mask(x, 0.25, None), np.float64)
    mn = m / np.sqrt(((w + SCALE * (a @ b).T) ** 2).sum(axis=1))
    want = x @ w.T + 1.0 + (mn - 1) * (xd @ w.T) + mn * (SCALE * (xd @ a) @ b)
    assert_close(got, want, 1e-5)


class OwnNnx(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (6, 4)))

    def __call__(self, x):
        return jnp.einsum("bi,oi->bo", x, self.w[...]) + 1.0


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(11, 6, rngs=rngs)
        self.conv = nnx.Conv(4, 5, (3, 3), rngs=rngs)
        self.conv1d = nnx.Conv(4, 3, (2,), rngs=rngs)
        self.own = OwnNnx(rngs)

    def __call__(self, ids, img, x):
        return self.emb(ids), self.conv(img), self.conv1d(img[:, 0]), self.own(x)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_nnx_equals_linen(dropout, monkeypatch):
    monkeypatch.setattr(jax_lora.factors, "dropout", _mask)
    cfg = dataclasses.replace(CFG, dropout=dropout)
    wrapped = jax_lora.wrap(Model(), cfg)
    v = wrapped.init(KEY, *_inputs())
    net = NnxModel(nnx.Rngs(0))
    for (layer, name), _ in INS.items():
        getattr(getattr(net, layer), name)[...] = v["params"][layer][name]
    net.conv.bias[...] = v["params"]["conv"]["bias"]
    net.conv1d.bias[...] = v["params"]["conv1d"]["bias"]
    model = jax_lora.wrap(net, cfg, example=_inputs())
    assert type(model.conv).__name__ == "LoraConv" and model.conv.kernel_lora_m.shape == (5,)
    state = jax_lora.lora_state(model)
    assert jax.tree.map(jnp.shape, state) == jax.tree.map(jnp.shape, v["lora"])
    for (layer, name), _ in INS.items():  # the same fresh magnitudes ‖W‖ (b = 0)
        assert_close(state[layer][name]["m"], v["lora"][layer][name]["m"], 1e-6)
    v["lora"] = _randomize(v["lora"])
    jax_lora.load_lora(model, v["lora"])
    kw = {"rngs": {"dropout": jax.random.key(1)}} if dropout else {}
    if not dropout:
        model = nnx.view(model, deterministic=True)
    want = wrapped.apply(v, *_inputs(), **kw)
    assert_close(model(*_inputs()), want, 1e-6)

    def loss(m):
        return sum(jnp.sum(jnp.sin(o)) for o in m(*_inputs()))

    g_nnx = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    g_linen = jax.grad(
        lambda lora: sum(
            jnp.sum(jnp.sin(o)) for o in wrapped.apply({**v, "lora": lora}, *_inputs(), **kw)
        )
    )(v["lora"])
    for (layer, name), _ in INS.items():
        for k in ("a", "b", "m"):
            got = g_nnx[layer][f"{name}_lora_{k}"][...]
            assert_close(got, g_linen[layer][name][k], 1e-5)
    if not dropout:
        merged = jax_lora.merge(model)
        want_w = jax_lora.merge(v, cfg)
        for (layer, name), _ in INS.items():
            assert_close(getattr(getattr(merged, layer), name)[...], want_w[layer][name], 1e-6)
        back = jax_lora.unmerge(merged, model)
        for (layer, name), _ in INS.items():
            assert_close(getattr(getattr(back, layer), name)[...], v["params"][layer][name], 1e-5)


def test_peft_format_magnitude_layouts(linen_setup, tmp_path):
    """export_peft writes PEFT's lora_magnitude_vector shapes (a conv's ``(1, out, 1...)``,
    an embedding's ``(embedding_dim,)``) and import_peft reads them back exactly."""
    from safetensors.numpy import load_file, save_file

    _, v, _ = linen_setup
    lora = {k: v["lora"][k] for k in ("emb", "conv", "conv1d")}
    jax_lora.export_peft(tmp_path / "ad", lora, CFG)
    t = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert t["base_model.model.conv.lora_magnitude_vector"].shape == (1, 5, 1, 1)
    assert t["base_model.model.conv1d.lora_magnitude_vector"].shape == (1, 3, 1)
    assert t["base_model.model.emb.lora_magnitude_vector"].shape == (6,)
    back, cfg = jax_lora.import_peft(tmp_path / "ad", like=lora)
    assert cfg.use_dora
    for k in lora:
        name = "embedding" if k == "emb" else "kernel"
        for f in ("a", "b", "m"):
            np.testing.assert_array_equal(back[k][name][f], lora[k][name][f])
    t["base_model.model.conv.lora_magnitude_vector"] = np.ones((5,), np.float32)
    save_file(t, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"conv.lora_magnitude_vector.*\(5,\).*\(1, 5, 1, 1\)"):
        jax_lora.import_peft(tmp_path / "ad", like=lora)


class _OneConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(7, (3, 3), name="conv")(x)


class _OneEmbed(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Embed(13, 7, name="conv")(ids)  # named so that one target fits both


@pytest.mark.parametrize(
    "model, x, kernel",
    [
        (_OneConv(), jnp.ones((2, 6, 6, 4)), "f32[3,3,4,7]"),
        (_OneEmbed(), jnp.array([[1, 2, 12]]), "f32[13,7]"),
    ],
)
def test_backward_keeps_no_kernel_sized_residual(capsys, model, x, kernel):
    """The norm is a constant: the backward keeps its (out,) result, never W + s·a@b."""
    import jax.ad_checkpoint

    wrapped = jax_lora.wrap(model, dataclasses.replace(CFG, targets=("conv",)))
    v = wrapped.init(KEY, x)

    def loss(lora):
        return jnp.sum(wrapped.apply({"params": v["params"], "lora": lora}, x))

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, v["lora"])
    saved = capsys.readouterr().out
    assert "f32[7] output of sqrt" in saved  # the norm itself
    assert kernel not in saved, saved


def test_linen_magnitude_partitioned_as_the_weight_out_axes():
    """``m`` takes the names of the weight's output axes, as ``b`` does (and as the Dense case)."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, ids, img):
            init = nn.with_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
            kinit = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None, "in", "mlp"))
            e = nn.Embed(11, 6, embedding_init=init, name="emb")(ids)
            return e, nn.Conv(5, (3, 3), kernel_init=kinit, name="conv")(img)

    cfg = dataclasses.replace(CFG, targets=("emb", "conv"))
    ids, img, _ = _inputs()
    lora = jax_lora.wrap(Net(), cfg).init(KEY, ids, img)["lora"]
    m_emb, m_conv = lora["emb"]["embedding"]["m"], lora["conv"]["kernel"]["m"]
    assert isinstance(m_emb, nn.Partitioned) and m_emb.names == ("embed",)
    assert isinstance(m_conv, nn.Partitioned) and m_conv.names == ("mlp",)
    assert lora["emb"]["embedding"]["b"].names == (None, "embed")
    assert m_emb.value.shape == (6,) and m_conv.value.shape == (5,)
