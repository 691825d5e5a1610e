"""The NNX path: same math as linen (shared factors.py), graph surgery, NNX training idioms."""

import dataclasses
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close
from _models import MLP
from flax import nnx

import jax_lora
from jax_lora import LoraConfig


class NnxMLP(nnx.Module):
    """tests/_models.MLP in NNX: 16 -> 16 -> 16 -> 4."""

    def __init__(self, rngs):
        self.fc1, self.fc2, self.head = (
            nnx.Linear(16, 16, rngs=rngs),
            nnx.Linear(16, 16, rngs=rngs),
            nnx.Linear(16, 4, rngs=rngs),
        )

    def __call__(self, x):
        return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


class Heads(nnx.Module):
    def __init__(self, rngs):
        self.q = nnx.LinearGeneral(16, (2, 8), rngs=rngs)
        self.up = nnx.Einsum("btd,dnf->btnf", (16, 2, 8), rngs=rngs)
        self.out = nnx.LinearGeneral((2, 8), 16, axis=(-2, -1), rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x):
        return self.ln(self.out(self.q(x) * self.up(x)))


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax and nnx internals
        yield


def _pair(cfg, seed=7):
    """The same weights and factors in linen and NNX (every layer, the head included: linen's
    targets=None leaves the output head out, NNX without an `example` cannot tell it)."""
    if cfg.targets is None:
        cfg = dataclasses.replace(cfg, targets=["fc1", "fc2", "head"])
    x = jax.random.normal(jax.random.key(1), (8, 16))
    wrapped = jax_lora.wrap(MLP(), cfg)
    v = wrapped.init(jax.random.key(0), x)
    v["lora"] = jax.tree.map(
        lambda t: 0.3 * jax.random.normal(jax.random.key(seed + t.size), t.shape), v["lora"]
    )
    model = jax_lora.wrap(NnxMLP(nnx.Rngs(0)), cfg)
    for name in ("fc1", "fc2", "head"):
        layer = getattr(model, name)
        layer.kernel[...] = v["params"][name]["kernel"]
        layer.bias[...] = v["params"][name]["bias"]
    jax_lora.load_lora(model, v["lora"])
    return x, wrapped, v, model


def test_surgery_keeps_objects_and_paths():
    model = NnxMLP(nnx.Rngs(0))
    kernel = model.fc1.kernel
    before = nnx.state(model, nnx.Param)
    jax_lora.wrap(model, LoraConfig(rank=2, targets="fc.*"))
    assert model.fc1.kernel is kernel and type(model.fc1).__name__ == "LoraLinear"
    assert type(model.head) is nnx.Linear
    after = nnx.state(model, nnx.Param)
    assert set(
        jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(before)[0]
    ) < set(jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(after)[0])
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(model)) == {
        "fc1": {"a": (16, 2), "b": (2, 16)},
        "fc2": {"a": (16, 2), "b": (2, 16)},
    }
    x = jnp.ones((2, 16))
    assert_close(model(x), NnxMLP(nnx.Rngs(0))(x), 0.0)  # b = 0: the base output exactly


@pytest.mark.parametrize("rslora", [False, True])
def test_linen_and_nnx_agree(rslora):
    cfg = LoraConfig(rank=4, alpha=6, rslora=rslora)
    x, wrapped, v, model = _pair(cfg)
    assert_close(nnx.jit(lambda m, x: m(x))(model, x), wrapped.apply(v, x), 1e-6)

    def nnx_loss(m):
        return jnp.sum(m(x) ** 2)

    g_nnx = nnx.grad(nnx_loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    g_linen = jax.grad(
        lambda lora: jnp.sum(wrapped.apply({"params": v["params"], "lora": lora}, x) ** 2)
    )(v["lora"])
    for name in ("fc1", "fc2", "head"):
        assert_close(g_nnx[name]["lora_a"][...], g_linen[name]["a"], 1e-5)
        assert_close(g_nnx[name]["lora_b"][...], g_linen[name]["b"], 1e-5)


def test_multi_axis_layers():
    model = jax_lora.wrap(Heads(nnx.Rngs(0)), LoraConfig(rank=3), rngs=nnx.Rngs(5))
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(model)) == {
        "q": {"a": (16, 3), "b": (3, 2, 8)},
        "up": {"a": (16, 3), "b": (3, 2, 8)},
        "out": {"a": (2, 8, 3), "b": (3, 16)},
    }
    lora = jax.tree.map(
        lambda t: 0.2 * jax.random.normal(jax.random.key(t.size), t.shape),
        jax_lora.lora_state(model),
    )
    jax_lora.load_lora(model, lora)
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    merged = jax_lora.merge(model)
    assert not jax_lora.nnx.adapted_layers(merged) and jax_lora.nnx.adapted_layers(model)
    assert_close(merged(x), model(x), 1e-5)
    back = jax_lora.unmerge(merged, model)
    with jax_lora.disabled():
        assert_close(back(x), model(x), 1e-5)


def test_nnx_optimizer_trains_factors_only():
    x, _, _, model = _pair(LoraConfig(rank=4))
    y = jax.random.normal(jax.random.key(3), (8, 4))
    base = jax.tree.map(np.array, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt):
        loss, g = nnx.value_and_grad(
            lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
        )(model)
        opt.update(model, g)
        return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.7 * losses[0]
    jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Not(nnx.LoRAParam)), base)
    n_lora = sum(t.size for t in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    floats = [t for t in jax.tree.leaves(nnx.state(opt)) if jnp.issubdtype(t.dtype, jnp.floating)]
    assert sum(t.size for t in floats) == 2 * n_lora


def test_jax_lora_optimizer_on_nnx_state():
    _, _, _, model = _pair(LoraConfig(rank=2))
    state = nnx.state(model, nnx.Param)
    tx = jax_lora.optimizer(optax.adam(1e-3))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, state), tx.init(state), state)
    mask = jax_lora.trainable_mask(state)
    for u, m in zip(jax.tree.leaves(updates), jax.tree.leaves(mask), strict=True):
        assert np.asarray(u).all() if m else not np.asarray(u).any()
    assert sum(jax.tree.leaves(mask)) == 6  # a and b of three layers


def test_disable_dropout_and_report():
    model = jax_lora.wrap(NnxMLP(nnx.Rngs(0)), LoraConfig(rank=2, dropout=0.5), rngs=nnx.Rngs(3))
    jax_lora.load_lora(model, jax.tree.map(jnp.ones_like, jax_lora.lora_state(model)))
    x = jnp.ones((4, 16))
    model.eval()
    y_eval = model(x)
    assert_close(model(x), y_eval, 0.0)
    model.train()
    y1, y2 = model(x), model(x)
    assert np.abs(np.asarray(y1 - y_eval)).max() > 1e-3 and np.abs(np.asarray(y1 - y2)).max() > 1e-3
    model.eval()
    plain = NnxMLP(nnx.Rngs(0))
    with jax_lora.disabled():
        assert_close(model(x), plain(x), 0.0)
    jax_lora.nnx.set_enabled(model, False)
    assert_close(model(x), plain(x), 0.0)
    rep = jax_lora.param_report(model)
    assert (
        rep.trainable == 2 * (16 * 2 + 2 * 16) + (16 * 2 + 2 * 4)
        and rep.total == 16 * 16 * 2 + 16 * 4 + 16 * 2 + 4 + rep.trainable
    )


def test_checkpoint_and_peft_round_trip_from_nnx(tmp_path):
    _, _, v, model = _pair(LoraConfig(rank=4, alpha=8))
    with jax_lora.AdapterCheckpointer(tmp_path / "ck") as ck:
        ck.save(1, jax_lora.lora_state(model), LoraConfig(rank=4, alpha=8))
        ck.wait()
        r = ck.restore(jax_lora.lora_state(model))
    fresh = jax_lora.wrap(NnxMLP(nnx.Rngs(0)), r.config)
    jax_lora.load_lora(fresh, r.lora)
    jax.tree.map(
        np.testing.assert_array_equal, jax_lora.lora_state(fresh), jax_lora.lora_state(model)
    )
    jax_lora.export_peft(tmp_path / "peft", jax_lora.lora_state(model), LoraConfig(rank=4, alpha=8))
    lora, cfg = jax_lora.import_peft(tmp_path / "peft", like=jax_lora.lora_state(model))
    assert cfg.rank == 4 and cfg.alpha == 8.0
    jax.tree.map(np.testing.assert_array_equal, lora, jax.tree.map(np.asarray, v["lora"]))


def test_nnx_remat():
    x, wrapped, v, model = _pair(LoraConfig(rank=2))

    @nnx.remat
    def fwd(m, x):
        return m(x)

    g = nnx.grad(lambda m: jnp.sum(fwd(m, x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    g_linen = jax.grad(
        lambda lora: jnp.sum(wrapped.apply({"params": v["params"], "lora": lora}, x) ** 2)
    )(v["lora"])
    assert_close(g["fc2"]["lora_b"][...], g_linen["fc2"]["b"], 1e-5)


def test_same_errors_as_linen():
    with pytest.raises(ValueError, match=r"`rank`=5 .* 'head'"):
        jax_lora.wrap(NnxMLP(nnx.Rngs(0)), LoraConfig(rank=5))
    with pytest.raises(ValueError, match="matches no supported layer") as e:
        jax_lora.wrap(NnxMLP(nnx.Rngs(0)), LoraConfig(rank=2, targets="nope"))
    assert "fc2  (Linear)" in str(e.value)
    with pytest.raises(ValueError, match="'ln' of type LayerNorm"):
        jax_lora.wrap(Heads(nnx.Rngs(0)), LoraConfig(rank=2, targets="ln|q"))
    model = jax_lora.wrap(NnxMLP(nnx.Rngs(0)), LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already has LoRA factors"):
        jax_lora.wrap(model, LoraConfig(rank=2))
    with pytest.raises(
        ValueError, match=r"has 'fc1/a' with shape \(16, 3\), the model needs \(16, 2\)"
    ):
        jax_lora.load_lora(
            model, jax_lora.lora_state(jax_lora.wrap(NnxMLP(nnx.Rngs(0)), LoraConfig(rank=3)))
        )
    assert nn.Dense  # linen and nnx coexist in one process


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(16, 16, rngs=rngs)

    def __call__(self, x):
        return x + nnx.tanh(self.fc(x))


class Stack(nnx.Module):
    """Blocks made with nnx.vmap (kernels (L, 16, 16)), run with nnx.scan."""

    def __init__(self, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_scanned_stack_equals_unrolled():
    n = 3
    model = jax_lora.wrap(Stack(n, nnx.Rngs(0)), LoraConfig(rank=2), rngs=nnx.Rngs(1))
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(model)) == {
        "blocks": {"fc": {"a": (n, 16, 2), "b": (n, 2, 16)}}
    }
    lora = jax.tree.map(
        lambda t: 0.3 * jax.random.normal(jax.random.key(t.size), t.shape),
        jax_lora.lora_state(model),
    )
    jax_lora.load_lora(model, lora)
    x = jax.random.normal(jax.random.key(2), (4, 16))
    want = x
    for i in range(n):  # the same stack, unrolled, with the scale-1 update in the kernel
        k = (
            model.blocks.fc.kernel[...][i]
            + lora["blocks"]["fc"]["a"][i] @ lora["blocks"]["fc"]["b"][i]
        )
        want = want + jnp.tanh(want @ k + model.blocks.fc.bias[...][i][None])
    assert_close(model(x), want, 1e-5)
    assert_close(jax_lora.merge(model)(x), want, 1e-5)
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    assert g["blocks"]["fc"]["lora_a"][...].shape == (n, 16, 2)
    assert all(np.abs(np.asarray(g["blocks"]["fc"]["lora_b"][...][i])).max() > 0 for i in range(n))


def test_factors_inherit_partitioning():
    init = nnx.initializers.lecun_normal()
    with nnx.use_eager_sharding(False):
        model = Heads(nnx.Rngs(0))
        model.q = nnx.LinearGeneral(
            16,
            (2, 8),
            kernel_init=nnx.with_partitioning(init, ("embed", "heads", "kv")),
            rngs=nnx.Rngs(0),
        )
        jax_lora.wrap(model, LoraConfig(rank=2, targets="q|up"))
    spec = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
    P = jax.sharding.PartitionSpec
    assert spec["q"]["lora_a"].get_value() == P("embed", None)
    assert spec["q"]["lora_b"].get_value() == P(None, "heads", "kv")
    assert spec["up"]["lora_a"].get_value() == P()  # no names on the kernel: replicated


class Wide(nnx.Module):
    """Two zero-kernel Linear(n, 1) side by side, then Dropout: ``(1, n) -> (1, 2)``."""

    def __init__(self, n, rngs):
        zeros = nnx.initializers.zeros
        self.l1 = nnx.Linear(n, 1, use_bias=False, kernel_init=zeros, rngs=rngs)
        self.l2 = nnx.Linear(n, 1, use_bias=False, kernel_init=zeros, rngs=rngs)
        self.drop = nnx.Dropout(0.0, rngs=rngs)

    def __call__(self, x):
        return self.drop(jnp.concatenate([self.l1(x), self.l2(x)], axis=-1))


N, P = 4000, 0.25


def _wide(dropout=P, before=None):
    """A `Wide` with a = b = ones: each output is the sum of the LoRA input after dropout."""
    model = Wide(N, nnx.Rngs(0))
    if before is not None:
        before(model)
    model = jax_lora.wrap(model, LoraConfig(rank=1, dropout=dropout), rngs=nnx.Rngs(3))
    jax_lora.load_lora(model, jax.tree.map(jnp.ones_like, jax_lora.lora_state(model)))
    return model


def _assert_valid_dropout(y):
    for v in np.asarray(y).ravel():
        kept = float(v) * (1 - P)  # inverted dropout: each kept unit counts 1 / (1 - P)
        assert abs(kept - round(kept)) < 1e-2 and round(kept) != N, kept
        assert abs(kept - N * (1 - P)) < 4 * np.sqrt(N * P * (1 - P))


_EVAL = {
    "eval()/train()": lambda m: (m.eval(), m)[1],
    "set_attributes": lambda m: (m.set_attributes(deterministic=True), m)[1],
    "nnx.view": lambda m: nnx.view(m, deterministic=True),
    "nnx.with_attributes": lambda m: nnx.with_attributes(m, deterministic=True),
}
_TRAIN = {
    "eval()/train()": lambda m: (m.train(), m)[1],
    "set_attributes": lambda m: (m.set_attributes(deterministic=False), m)[1],
    "nnx.view": lambda m: nnx.view(m, deterministic=False),
    "nnx.with_attributes": lambda m: nnx.with_attributes(m, deterministic=False),
}


@pytest.mark.parametrize("how", list(_EVAL))
def test_dropout_follows_eval_mode(how):
    x = jnp.ones((1, N))
    model = _wide()
    want = np.full((1, 2), float(N), np.float32)  # the branch without dropout: sum(x) = N
    _assert_valid_dropout(model(x))  # a fresh model trains
    ev = _EVAL[how](model)
    np.testing.assert_array_equal(np.asarray(ev(x)), want)
    np.testing.assert_array_equal(np.asarray(ev(x)), want)
    tr = _TRAIN[how](ev)
    y1, y2 = tr(x), tr(x)
    _assert_valid_dropout(y1)
    _assert_valid_dropout(y2)
    assert (np.asarray(y1) != np.asarray(y2)).all()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_wrap_takes_the_models_current_mode(mode):
    x = jnp.ones((1, N))
    model = _wide(before=lambda m: getattr(m, mode)())
    assert model.l1.deterministic == model.l2.deterministic == (mode == "eval")
    y1, y2 = model(x), model(x)
    if mode == "eval":
        np.testing.assert_array_equal(np.asarray(y1), np.full((1, 2), float(N), np.float32))
        np.testing.assert_array_equal(np.asarray(y2), np.asarray(y1))
    else:
        _assert_valid_dropout(y1)
        assert (np.asarray(y1) != np.asarray(y2)).all()


def test_layers_get_their_own_dropout_masks():
    x = jnp.ones((1, N))
    model = _wide()
    y = np.asarray(model(x))
    assert y[0, 0] != y[0, 1]  # l1 and l2 draw different masks on the same input
    # and each layer's stream is its own: l2's first mask does not depend on l1 being called
    a, b = _wide(), _wide()
    a.l1(x)
    np.testing.assert_array_equal(np.asarray(a.l2(x)), np.asarray(b.l2(x)))


class MyLinear(nnx.Linear):
    """A user's subclass of a supported layer: gets a generated LoRA class."""


def test_pickle_and_split_merge_round_trips():
    x = jax.random.normal(jax.random.key(2), (2, 16))
    model = NnxMLP(nnx.Rngs(0))
    model.fc2 = MyLinear(16, 16, rngs=nnx.Rngs(1))
    model = jax_lora.wrap(model, LoraConfig(rank=2, dropout=0.1))
    jax_lora.load_lora(model, jax.tree.map(lambda t: t + 0.3, jax_lora.lora_state(model)))
    model.eval()
    want = np.asarray(model(x))
    assert type(model.fc1) is jax_lora.nnx.LoraLinear
    assert isinstance(model.fc2, MyLinear) and jax_lora.nnx.is_adapted(model.fc2)
    back = pickle.loads(pickle.dumps(model))
    assert type(back.fc1) is type(model.fc1) and type(back.fc2) is type(model.fc2)
    np.testing.assert_array_equal(np.asarray(back(x)), want)
    graphdef, state = nnx.split(model)
    again = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(again(x)), want)
    graphdef2 = pickle.loads(pickle.dumps(graphdef))  # the graphdef holds the classes
    np.testing.assert_array_equal(np.asarray(nnx.merge(graphdef2, state)(x)), want)
    back.train()
    assert back.fc1.deterministic is False and back.fc2.deterministic is False


def test_merge_leaves_no_injected_attributes():
    x = jax.random.normal(jax.random.key(2), (2, 16))
    model = NnxMLP(nnx.Rngs(0))
    model.fc2 = MyLinear(16, 16, rngs=nnx.Rngs(1))
    fresh = nnx.clone(model)
    jax_lora.wrap(model, LoraConfig(rank=2, dropout=0.1))
    merged = jax_lora.merge(model)
    for name in ("fc1", "fc2", "head"):
        got, want = getattr(merged, name), getattr(fresh, name)
        assert type(got) is type(want) and set(vars(got)) == set(vars(want)), name
    assert_close(merged(x), model(x), 1e-5)  # a fresh model trains; dropout is off in eval
    model.eval()
    assert_close(merged(x), model(x), 1e-5)


def test_set_enabled_for_linen_and_nnx():
    x = jnp.ones((4, 16))
    model = jax_lora.wrap(NnxMLP(nnx.Rngs(0)), LoraConfig(rank=2))
    jax_lora.load_lora(model, jax.tree.map(jnp.ones_like, jax_lora.lora_state(model)))
    plain = NnxMLP(nnx.Rngs(0))
    assert jax_lora.set_enabled(model, False) is model  # NNX: in place
    assert_close(model(x), plain(x), 0.0)
    jax_lora.set_enabled(model, True)
    assert np.abs(np.asarray(model(x) - plain(x))).max() > 0.1
    wrapped = jax_lora.wrap(MLP(), LoraConfig(rank=2))
    v = wrapped.init(jax.random.key(0), x)
    v["lora"] = jax.tree.map(jnp.ones_like, v["lora"])
    off = jax_lora.set_enabled(wrapped, False)  # linen: a clone, the original unchanged
    assert wrapped.enabled and not off.enabled
    np.testing.assert_array_equal(
        np.asarray(off.apply(v, x)), np.asarray(MLP().apply({"params": v["params"]}, x))
    )
    with pytest.raises(TypeError, match="got Dense"):
        jax_lora.set_enabled(nn.Dense(3), False)


def test_scanned_stack_with_dropout():
    """A stacked layer gets one dropout stream per stack entry (keys ``(n,)``), so nnx.scan can
    slice it like the kernel; eval equals the no-dropout model exactly."""
    n, x = 3, jax.random.normal(jax.random.key(2), (4, 16))
    model = jax_lora.wrap(Stack(n, nnx.Rngs(0)), LoraConfig(rank=2, dropout=0.5), rngs=nnx.Rngs(1))
    ref = jax_lora.wrap(Stack(n, nnx.Rngs(0)), LoraConfig(rank=2), rngs=nnx.Rngs(1))
    lora = jax.tree.map(lambda t: t + 0.3, jax_lora.lora_state(model))
    jax_lora.load_lora(model, lora)
    jax_lora.load_lora(ref, lora)
    assert model.blocks.fc.lora_rngs.key[...].shape == (n,)
    y1, y2 = model(x), model(x)
    assert np.abs(np.asarray(y1 - y2)).max() > 1e-3 and np.abs(np.asarray(y1 - ref(x))).max() > 1e-3
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(ref(x)))
