"""QLoRA on weights that are not flax Dense-family kernels (jax_lora/weights.py's traced path).

A targeted ``nn.Conv`` / ``nn.Embed`` / custom-layer weight stored as a `QArray` gets its adapter
exactly as its float twin would. The reference is always the same wrapped model with every
`QArray` replaced by ``dequantize(q)`` (an fp32 base with the same values): outputs, factor
gradients and input gradients must agree (≤1e-6 relative, fp32), and ``disabled()`` must give
the dequantized base model's output.
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from jax import lax

import jax_lora
from jax_lora import LoraConfig, quant

KEY = jax.random.key(0)


def _normal(shape, seed, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: kernel stored ``(out, in)``, applied as ``x @ kernel.T``."""

    features: int

    @nn.compact
    def __call__(self, x):
        w = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
        b = self.param("bias", nn.initializers.normal(0.1), (self.features,))
        y = lax.dot_general(x, w.T, (((x.ndim - 1,), (0,)), ((), ())))
        return y + b.reshape((1,) * (y.ndim - 1) + b.shape)


class CustomNet(nn.Module):
    """The user's own layer: a ``self.param`` used in ``x @ w.T``."""

    layers: int = 1
    d: int = 32

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = x + jnp.tanh(Conv1D(self.d, name=f"c{i}")(x))
        return x


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(16, (3, 3), padding="SAME", name="conv")(x)
        return nn.Conv(8, (1, 1), name="conv2")(jnp.tanh(h))


class TiedLM(nn.Module):
    """An embedding used for the lookup and (transposed) as the output head."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(32, 16, embedding_init=nn.initializers.normal(0.5), name="emb")
        return emb.attend(jnp.tanh(emb(ids)))


class Einsum(nn.Module):
    """gemma's Einsum: the equation is passed at call time, the weight is ``w``."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn: str, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.5), self.shape)
        return jnp.einsum(eqn, x, w)


class FeedForward(nn.Module):
    """gemma's FeedForward: its Einsums share its scope (``mlp/gating_einsum``, ``mlp/linear``);
    the gating weight ``(2, H, F)`` holds two projections, used transposed."""

    @nn.compact
    def __call__(self, x):
        gating = Einsum((2, 16, 8), weight_name="gating_einsum")
        nn.share_scope(self, gating)
        gate = gating("...F,NHF->...NH", x)
        h = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        linear = Einsum((16, 8), weight_name="linear")
        nn.share_scope(self, linear)
        return linear("...H,HF->...F", h)


class FFWModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return FeedForward(name="mlp")(x)


class ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(Conv1D(16, name="c")(x)), None


class ScanStack(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            ScanBlock,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True, "dropout": True},
            length=3,
        )
        return stack(name="layers")(x, None)[0]


@dataclasses.dataclass(frozen=True)
class Case:
    model: nn.Module
    x: Callable[[], jax.Array]
    targets: tuple[str, ...]
    quantize: dict  # kwargs of jax_lora.quantize (targets, axis, block)
    factors: dict  # the expected factor shapes {path: (a, b)}


CASES = {
    # Conv kernel (kh, kw, in, out): blocks along `in` (axis -2)
    "conv2d": Case(
        ConvNet(),
        lambda: _normal((2, 6, 6, 8), 1),
        ("conv", "conv2"),
        {"targets": r"conv2?/kernel", "block": 8},
        {"conv/kernel": ((3, 3, 8, 4), (4, 16)), "conv2/kernel": ((1, 1, 16, 4), (4, 8))},
    ),
    # Embed (vocab, d): lookup gathers rows, attend contracts d; blocks along d (axis -1)
    "embed": Case(
        TiedLM(),
        lambda: jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 5)), jnp.int32),
        ("emb",),
        {"targets": r"emb/embedding", "axis": -1, "block": 8},
        {"emb/embedding": ((32, 4), (4, 16))},
    ),
    # a custom (out, in) weight; blocks along the contraction axis `in` (axis -1)
    "custom": Case(
        CustomNet(2),
        lambda: _normal((2, 5, 32), 2),
        (r"c\d/kernel",),
        {"targets": r"c\d/kernel", "axis": -1, "block": 16},
        {"c0/kernel": ((32, 4), (4, 32)), "c1/kernel": ((32, 4), (4, 32))},
    ),
    # nn.share_scope children: one adapter per gating slice, blocks along F (axis -1)
    "ffw": Case(
        FFWModel(),
        lambda: _normal((2, 5, 8), 4),
        (r"mlp/(gating_einsum|linear)",),
        {"targets": r"mlp/(gating_einsum|linear)", "axis": -1, "block": 8},
        {"mlp/gating_einsum": ((2, 8, 4), (2, 4, 16)), "mlp/linear": ((16, 4), (4, 8))},
    ),
    # the stacked (layers, out, in) kernel of a scanned custom layer
    "scan": Case(
        ScanStack(),
        lambda: _normal((2, 5, 16), 3),
        ("layers/c",),
        {"targets": r"layers/c/kernel", "axis": -1, "block": 8},
        {"layers/c/kernel": ((3, 16, 4), (3, 4, 16))},
    ),
}


def _paths(tree, prefix=""):
    if isinstance(tree, dict) and set(tree) == {"a", "b"}:
        return {prefix: (tuple(tree["a"].shape), tuple(tree["b"].shape))}
    out = {}
    for k, v in tree.items():
        out.update(_paths(v, f"{prefix}/{k}" if prefix else k))
    return out


def _setup(name, qtype="nf4", **qkw):
    case = CASES[name]
    x = case.x()
    params = case.model.init(KEY, x)["params"]
    qparams = quant.quantize(params, qtype, **{**case.quantize, **qkw})
    config = LoraConfig(rank=4, alpha=6.0, targets=case.targets)
    wrapped = jax_lora.wrap(case.model, config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qparams}, x)
    assert _paths(lora) == case.factors  # the same adapters as on the float weight
    leaves, tree = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    lora = jax.tree.unflatten(  # b != 0: the branch counts
        tree, [0.3 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
    )
    return case, x, wrapped, qparams, quant.dequantize(qparams), lora


def _grads(wrapped, params, lora, x, probe, jit):
    """Gradients of ``sum(y * probe)`` for the factors (and for ``x`` when it is a float)."""

    def loss(lora, x):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, x) * probe)

    argnums = (0, 1) if jnp.issubdtype(x.dtype, jnp.floating) else 0
    f = jax.grad(loss, argnums=argnums)
    return (jax.jit(f) if jit else f)(lora, x)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_grads_and_disabled_equal_dequantized_base(name):
    case, x, wrapped, qparams, dense, lora = _setup(name)
    variables = {"params": qparams, "lora": lora}
    y_d = wrapped.apply({"params": dense, "lora": lora}, x)
    base = case.model.apply({"params": dense}, x)
    assert float(jnp.abs(y_d - base).max()) > 1e-2  # the adapters move the output
    assert_close(wrapped.apply(variables, x), y_d, 1e-6)
    assert_close(jax.jit(wrapped.apply)(variables, x), y_d, 1e-6)
    # gradients (the training step is jitted; both sides jitted: XLA's own rounding aside)
    probe = _normal(y_d.shape, 5)
    got = _grads(wrapped, qparams, lora, x, probe, True)
    assert_close(got, _grads(wrapped, dense, lora, x, probe, True), 1e-6)
    with jax_lora.disabled():
        off = wrapped.apply(variables, x)
        off_jit = jax.jit(wrapped.apply)(variables, x)
    np.testing.assert_array_equal(np.asarray(off), np.asarray(base))
    assert_close(off_jit, base, 1e-6)


def test_step_keeps_about_one_dequantized_weight_alive():
    """The compiled training step of 6 quantized custom layers holds about one dequantized
    weight in its temporaries, not all six (nor keeps them for the backward pass)."""
    layers, d = 6, 256
    model, x = CustomNet(layers, d), _normal((4, d), 1)
    params = model.init(KEY, x)["params"]
    qparams = quant.quantize(params, "nf4", targets=r"c\d/kernel", axis=-1)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4, targets=r"c\d/kernel"))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qparams}, x)
    assert len(lora) == layers

    def loss(lora, params):
        return jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, x)))

    fp32_weights = layers * d * d * 4
    mem = jax.jit(jax.grad(loss)).lower(lora, qparams).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.35 * fp32_weights, (mem.temp_size_in_bytes, fp32_weights)
    assert mem.argument_size_in_bytes < 0.35 * fp32_weights  # codes + scales + factors
    # the same step on the fp32 base: its arguments alone are the weights
    dense = jax.jit(jax.grad(loss)).lower(lora, quant.dequantize(qparams)).compile()
    assert dense.memory_analysis().argument_size_in_bytes > fp32_weights


class DenseAndCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, name="fc")(x))
        h = jnp.tanh(Conv1D(8, name="proj")(h))
        return nn.Dense(4, name="head")(h)


def test_targets_none_adapts_a_quantized_custom_weight():
    """All-linear (``targets=None``) gives the quantized custom layer its adapter, as on the
    float base (the Dense head is left out on both)."""
    model, x = DenseAndCustom(), _normal((3, 16), 1)
    params = model.init(KEY, x)["params"]
    wrapped = jax_lora.wrap(model, LoraConfig(rank=2))
    want = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, x)
    assert jax.tree.map(jnp.shape, want) == {
        "fc": {"a": (16, 2), "b": (2, 16)},
        "proj": {"kernel": {"a": (16, 2), "b": (2, 8)}},
    }
    qparams = quant.quantize(params, "nf4", block=8, targets=r"(fc|proj|head)/kernel")
    got = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qparams}, x)
    assert jax.tree.map(jnp.shape, got) == jax.tree.map(jnp.shape, want)
    lora = jax.tree.map(lambda t: t + 0.2, got)
    assert_close(
        wrapped.apply({"params": qparams, "lora": lora}, x),
        wrapped.apply({"params": quant.dequantize(qparams), "lora": lora}, x),
        1e-6,
    )


class OneCustom(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv1D(12, name="c")(x)


def test_dropout_masks_are_the_same_in_the_backward_pass():
    """With LoRA dropout on, the backward pass (which re-runs the layer) must see the forward
    pass's masks. ``y`` is linear in ``b``, so ``<dL/db, b> == sum((y - y(b=0)) * probe)``
    holds exactly when both passes use one mask."""
    model, x = OneCustom(), _normal((4, 5, 16), 1)
    params = quant.quantize(model.init(KEY, x)["params"], "int8", targets="c/kernel", axis=-1)
    wrapped = jax_lora.wrap(model, LoraConfig(rank=4, alpha=8.0, dropout=0.5, targets="c"))
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, x)
    lora = jax.tree.map(lambda t: t + 0.3, lora)
    rngs = {"dropout": jax.random.key(7)}
    probe = _normal((4, 5, 12), 2)

    def run(lora):
        return wrapped.apply({"params": params, "lora": lora}, x, rngs=rngs)

    y, y0 = (
        run(lora),
        run({"c": {"kernel": {**lora["c"]["kernel"], "b": 0 * lora["c"]["kernel"]["b"]}}}),
    )
    y_nodrop = wrapped.apply({"params": params, "lora": lora}, x)
    assert float(jnp.abs(y - y_nodrop).max()) > 1e-2  # dropout really ran
    g = jax.jit(jax.grad(lambda lora: jnp.sum(run(lora) * probe)))(lora)
    b = lora["c"]["kernel"]["b"]
    assert_close(jnp.sum(g["c"]["kernel"]["b"] * b), jnp.sum((y - y0) * probe), 1e-5)


class ScaleLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x * self.param("w", nn.initializers.normal(0.5), x.shape[-2:])


class ElementwiseNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Conv1D(6, name="c")(ScaleLayer(name="scale")(x))


def test_quantized_weight_lora_cannot_follow_is_refused_by_path_and_class():
    x = _normal((4, 8), 3)
    params = quant.quantize(
        ElementwiseNet().init(KEY, x)["params"], "int8", targets=r"(scale/w|c/kernel)"
    )
    wrapped = jax_lora.wrap(ElementwiseNet(), LoraConfig(rank=2, targets=("scale/w", "c")))
    with pytest.raises(ValueError) as e:
        jax_lora.init_lora(wrapped, KEY, {"params": params}, x)
    msg = str(e.value)
    assert f"'scale/w' ({__name__}.ScaleLayer)" in msg and "`mul`" in msg, msg
    # targets=None: skipped with a warning, the quantized Conv1D weight still adapted
    wrapped = jax_lora.wrap(ElementwiseNet(), LoraConfig(rank=2))
    with pytest.warns(UserWarning, match=r"skipped 1 weight.*scale/w \(it goes through `mul`"):
        lora = jax_lora.init_lora(wrapped, KEY, {"params": params}, x)
    assert jax.tree.map(jnp.shape, lora) == {"c": {"kernel": {"a": (8, 2), "b": (2, 6)}}}


# ---------------------------------------------------------------------------------------------
# merge: a quantized generic weight comes back dense, dequantized + ΔW in its stored layout


@pytest.mark.parametrize("name", sorted(CASES))
def test_merge_gives_dequantized_plus_delta_in_the_stored_layout(name):
    case, x, wrapped, qparams, dense, lora = _setup(name)
    variables = {"params": qparams, "lora": lora}
    merged = jax_lora.merge(variables, wrapped, x)
    assert not quant.has_quantized(merged)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, dense)
    scale = wrapped.config.scale
    for path in case.factors:
        *mods, leaf = path.split("/")
        w, m, ab = dense, merged, lora
        for k in mods:
            w, m, ab = w[k], m[k], ab[k]
        a, b = (np.asarray(ab[leaf][k], np.float64) for k in "ab")
        # a @ b written by hand in each weight's stored layout
        eq = {
            "conv2d": "hwir,ro->hwio",  # conv (kh, kw, in, out)
            "embed": "vr,rd->vd",  # embedding (vocab, d)
            "custom": "ir,ro->oi",  # (out, in)
            "ffw": "nfr,nrh->nhf" if leaf == "gating_einsum" else "hr,rf->hf",
            "scan": "lir,lro->loi",  # stacked (layers, out, in)
        }[name]
        want = np.asarray(w[leaf], np.float64) + scale * np.einsum(eq, a, b)
        assert_close(m[leaf], want, 1e-6)
    # the plain model on the merged params == the wrapped model on the quantized base
    assert_close(case.model.apply({"params": merged}, x), wrapped.apply(variables, x), 2e-6)
    # the same as merging the dequantized base
    assert_close(merged, jax_lora.merge({"params": dense, "lora": lora}, wrapped, x), 0)


# ---------------------------------------------------------------------------------------------
# A real client: transformers' FlaxGPT2 (FlaxConv1D kernels stored (out, in)) on an nf4 base


@pytest.fixture(scope="module")
def gpt2():
    g = pytest.importorskip("test_clients_gpt2")  # skips without torch/peft/transformers
    cfg = g.transformers.GPT2Config(
        n_layer=g.N_LAYER, n_embd=g.D, n_head=4, vocab_size=g.VOCAB, n_positions=32
    )
    with g.hf_numerics():
        model = g.transformers.FlaxGPT2LMHeadModel(cfg, seed=0, dtype=jnp.float32)
    params = jax.tree.map(jnp.asarray, model.params)
    ids = np.random.default_rng(0).integers(0, g.VOCAB, (2, g.T)).astype(np.int32)
    pos = jnp.broadcast_to(jnp.arange(g.T, dtype=jnp.int32), (2, g.T))
    args = (jnp.asarray(ids), jnp.ones((2, g.T), jnp.int32), pos)
    # QLoRA quantizes the linear layers; blocks of 32 along the contraction axis `in` (-1)
    qparams = quant.quantize(
        params, "nf4", targets=r".*/c_(attn|proj|fc)/kernel", axis=-1, block=32
    )
    return g, model.module, params, qparams, args


def test_gpt2_nf4_base_logits_grads_and_merge(gpt2):
    g, module, params, qparams, args = gpt2
    assert quant.is_quantized(qparams["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"])
    dense = quant.dequantize(qparams)
    c_fc = ("transformer", "h", "1", "mlp", "c_fc", "kernel")
    w, w_q = params, dense
    for k in c_fc:
        w, w_q = w[k], w_q[k]
    assert 1e-4 < float(jnp.abs(w_q - w).max()) < 0.2 * float(jnp.abs(w).max())  # 4-bit error
    config, wrapped, lora = g.adapt(module, qparams, args, g.TARGETS)
    assert sorted(g.factor_paths(lora)) == g.ADAPTED  # as on the float base
    lora = g.random_factors(lora)
    got = g.run(wrapped, {"params": qparams, "lora": lora}, args)
    want = g.run(wrapped, {"params": dense, "lora": lora}, args)
    base = g.run(module, {"params": dense}, args)
    assert float(jnp.abs(want - base).max()) > 1e-2  # the adapters move the logits
    assert_close(got, want, 1e-6)
    with jax_lora.disabled():
        assert_close(g.run(wrapped, {"params": qparams, "lora": lora}, args), base, 1e-6)
    probe = _normal(got.shape, 4)

    def grads(params):
        def loss(lora):
            return jnp.sum(g.run(wrapped, {"params": params, "lora": lora}, args) * probe)

        return jax.jit(jax.grad(loss))(lora)

    # 2e-6: under jit XLA fuses each layer's dequantization into its matmuls, which rounds a
    # little differently through two transformer blocks (1.1e-6 seen)
    assert_close(grads(qparams), grads(dense), 2e-6)
    with g.hf_numerics():
        merged = jax_lora.merge(
            {"params": qparams, "lora": lora}, wrapped, *args, deterministic=True
        )
    assert not quant.has_quantized(merged)
    for path, ab in g.factor_paths(lora).items():
        w, m = dense, merged
        for k in path.split("/"):
            w, m = w[k], m[k]
        # stored (out, in): the update is (a @ b).T
        want_w = np.asarray(w) + config.scale * (np.asarray(ab["a"]) @ np.asarray(ab["b"])).T
        assert_close(m, want_w, 1e-6)
    assert_close(g.run(module, {"params": merged}, args), got, 1e-5)


# ---------------------------------------------------------------------------------------------
# quantize: a block that does not divide a Conv / Embed contraction axis


def test_quantize_block_not_dividing_conv_or_embed_axis_names_path_and_shape():
    conv = ConvNet().init(KEY, _normal((1, 6, 6, 8), 1))["params"]  # kernel (3, 3, 8, 16)
    with pytest.raises(ValueError) as e:
        quant.quantize(conv, "nf4")  # every kernel; blocks of 64 along `in` (8)
    msg = str(e.value)
    assert "'conv/kernel' of shape (3, 3, 8, 16)" in msg and "axis -2, size 8" in msg, msg
    ids = jnp.zeros((1, 3), jnp.int32)
    emb = TiedLM().init(KEY, ids)["params"]  # embedding (32, 16)
    with pytest.raises(ValueError) as e:
        quant.quantize(emb, "int4", targets="emb/embedding", axis=-1, block=12)
    msg = str(e.value)
    assert "'emb/embedding' of shape (32, 16)" in msg and "axis -1, size 16" in msg, msg
    assert "`block`=12" in msg, msg
    # the caller's params are left as they were
    assert not quant.has_quantized(conv) and not quant.has_quantized(emb)
