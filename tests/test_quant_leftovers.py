"""Quantized-base leftovers (issue #13 item 3): non-LoRA params trained next to a quantized
kernel (``also_train``), linen containers with ``setup`` children, NNX sharding under logical
axis rules, and NNX stacked (``nnx.vmap``/``nnx.scan``) quantized layers.

The reference is always the same model holding ``dequantize(q)`` as float weights (an fp32 base
with the same values) and the same factors; fp32 throughout, tolerances relative to the largest
reference value.
"""

import dataclasses
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _check import assert_close, max_rel_err, perturbed
from flax import nnx

import jax_lora
from jax_lora import quant

D, OUT = 64, 8
X = jax.random.normal(jax.random.key(1), (2, 5, D))


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax and nnx internals
        yield


# ------------------------------------------------------- 1. also_train next to a QArray


class LScaled(nn.Module):
    """A user's layer: a quantized ``w: (out, in)`` and a float ``g: (out,)`` in one scope."""

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.1), (D, x.shape[-1]))
        g = self.param("g", nn.initializers.ones, (D,))
        return (x @ w.T) * g[None, None]


class LBias(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, L, D) -> (B, L, OUT)
        h = nn.Dense(D, name="fc")(x)  # adapted: the Dense path
        h = h + nn.Conv(D, (3,), name="conv")(jnp.tanh(h))  # adapted: the generic path
        h = LScaled(name="custom")(jnp.tanh(h))  # adapted: a custom weight
        h = nn.Dense(D, name="frozen")(jnp.tanh(h))  # quantized, no LoRA
        return nn.Dense(OUT, name="head")(jnp.tanh(h))  # float


ALSO = ("fc/bias", "conv/bias", "custom/g", "frozen/bias")


def _sub(params, new):
    """``params`` with the leaves at ``ALSO`` paths replaced by ``new[path]``."""
    out = jax.tree.map(lambda x: x, params, is_leaf=quant.is_quantized)
    for p, v in new.items():
        a, b = p.split("/")
        out[a] = {**out[a], b: v}
    return out


@pytest.mark.parametrize("qtype", ["nf4"])
def test_linen_also_train_params_of_quantized_layers_get_the_float_gradient(qtype):
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets="fc|conv|custom")
    wrapped = jax_lora.wrap(LBias(), cfg)
    v = wrapped.init(jax.random.key(0), X)
    lora = perturbed(v["lora"])
    qp = quant.quantize(v["params"], qtype, targets="fc|conv|custom/w|frozen")
    dp = quant.dequantize(qp)
    extra = {p: perturbed(dp[p.split("/")[0]][p.split("/")[1]], 3) for p in ALSO}

    def loss(params, extra, lora):
        y = wrapped.apply({"params": _sub(params, extra), "lora": lora}, X)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)))
    g_extra, g_lora = grad(qp, extra, lora)
    w_extra, w_lora = grad(dp, extra, lora)
    assert {p: g_extra[p].shape for p in ALSO} == {p: (D,) for p in ALSO}
    for p in ALSO:
        assert float(jnp.abs(w_extra[p]).max()) > 1e-3, p  # the reference is not zero
    errs = {p: max_rel_err(g_extra[p], w_extra[p]) for p in ALSO}
    assert max(errs.values()) <= 1e-5, errs
    assert_close(g_lora, w_lora, 1e-5)


class NScaled(nnx.Module):
    """A user's layer: a quantized ``w: (out, in)`` and a float ``g: (out,)``."""

    def __init__(self, rngs):
        self.w = nnx.Param(0.1 * jax.random.normal(rngs.params(), (D, D)))
        self.g = nnx.Param(1.0 + 0.1 * jax.random.normal(rngs.params(), (D,)))

    def __call__(self, x):
        return (x @ self.w[...].T) * self.g[...][None, None]


class NBias(nnx.Module):
    """`LBias` in NNX."""

    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.conv = nnx.Conv(D, D, kernel_size=(3,), rngs=rngs)
        self.custom = NScaled(rngs)
        self.frozen = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, OUT, rngs=rngs)

    def __call__(self, x):
        h = self.fc(x)
        h = h + self.conv(jnp.tanh(h))
        h = self.custom(jnp.tanh(h))
        return self.head(jnp.tanh(self.frozen(jnp.tanh(h))))


def _extra_and_lora_grads(model):
    """Gradients of the ``ALSO`` params and the factors, as a pure dict."""
    wrt = nnx.Any(nnx.LoRAParam, *(nnx.PathContains(p.split("/")[1]) for p in ALSO))
    g = nnx.grad(lambda m: jnp.sum(jnp.sin(m(X))), argnums=nnx.DiffState(0, wrt))(model)
    return nnx.to_pure_dict(g)


@pytest.mark.parametrize("order", ["quantize_then_wrap", "wrap_then_quantize"])
def test_nnx_also_train_params_of_quantized_layers_get_the_float_gradient(order):
    model = NBias(nnx.Rngs(0))
    for p in ALSO:  # biases off zero
        layer, name = p.split("/")
        var = getattr(model, layer).__dict__[name]
        var.set_value(perturbed(var.get_value(), 3))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets=["fc", "conv", "custom/w"])
    qtargets = ["fc", "conv", "custom/w", "frozen"]
    if order == "quantize_then_wrap":
        jax_lora.quantize(model, "nf4", targets=qtargets)
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(3), example=(X,))
    if order == "wrap_then_quantize":
        jax_lora.quantize(model, "nf4", targets=qtargets)
    jax_lora.load_lora(model, perturbed(jax_lora.lora_state(model)))
    assert quant.is_quantized(model.frozen.kernel.get_value())
    dense = jax_lora.dequantize(nnx.clone(model))  # the float base with the same values
    g, want = nnx.jit(_extra_and_lora_grads)(model), _extra_and_lora_grads(dense)
    errs = {}
    for p in ALSO:
        layer, name = p.split("/")
        assert g[layer][name].shape == (D,)
        assert float(jnp.abs(want[layer][name]).max()) > 1e-3, p  # the reference is not zero
        errs[p] = max_rel_err(g[layer][name], want[layer][name])
    assert max(errs.values()) <= 1e-5, errs
    assert_close(g, want, 1e-5)  # the factors' too


# -------------------------------------- 4. linen: `setup` containers holding quantized weights


class Einsum(nn.Module):
    """gemma's Einsum: the equation is passed at call time, the weight is ``weight_name``."""

    shape: tuple[int, ...]
    weight_name: str = "w"

    @nn.compact
    def __call__(self, eqn, x):
        w = self.param(self.weight_name, nn.initializers.normal(0.5), self.shape)
        return jnp.einsum(eqn, x, w)


class SetupFFW(nn.Module):
    """gemma's FeedForward built in ``setup``: two Einsums sharing its scope (their weights
    ``mlp/gating_einsum (2, 16, 8)``, ``mlp/linear (16, 8)``) and its own float ``g (8,)``."""

    def setup(self):
        self.gate_proj = Einsum((2, 16, 8), weight_name="gating_einsum")
        nn.share_scope(self, self.gate_proj)
        self.out_proj = Einsum((16, 8), weight_name="linear")
        nn.share_scope(self, self.out_proj)
        self.g = self.param("g", nn.initializers.ones, (8,))

    def __call__(self, x):
        gate = self.gate_proj("...F,NHF->...NH", x)
        h = jax.nn.gelu(gate[..., 0, :]) * gate[..., 1, :]
        return self.out_proj("...H,HF->...F", h) * self.g[None, None]


class FFWModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return SetupFFW(name="mlp")(x)


XF = jax.random.normal(jax.random.key(4), (2, 5, 8))
FFW_TARGETS = r"mlp/(gating_einsum|linear)"


def test_linen_setup_container_with_quantized_children_equals_dequantized_float_model():
    params = FFWModel().init(jax.random.key(0), XF)["params"]
    qp = quant.quantize(params, "nf4", targets=FFW_TARGETS, axis=-1, block=8)
    wrapped = jax_lora.wrap(FFWModel(), jax_lora.LoraConfig(rank=4, alpha=6, targets=FFW_TARGETS))
    lora = perturbed(jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qp}, XF))
    shapes = jax.tree.map(jnp.shape, lora)  # one adapter per gating slice, as on a float base
    assert shapes == {
        "mlp": {
            "gating_einsum": {"a": (2, 8, 4), "b": (2, 4, 16)},
            "linear": {"a": (16, 4), "b": (4, 8)},
        }
    }
    dp = quant.dequantize(qp)

    def loss(params, g, lora):
        params = {"mlp": {**params["mlp"], "g": g}}
        return jnp.sum(jnp.sin(wrapped.apply({"params": params, "lora": lora}, XF)))

    g0 = 1.0 + 0.1 * jax.random.normal(jax.random.key(5), (8,))
    y = wrapped.apply({"params": qp, "lora": lora}, XF)
    want = wrapped.apply({"params": dp, "lora": lora}, XF)
    assert y.shape == (2, 5, 8)
    assert_close(y, want, 1e-6)
    with jax_lora.disabled():
        base = wrapped.apply({"params": qp, "lora": lora}, XF)
    assert_close(base, FFWModel().apply({"params": dp}, XF), 1e-6)
    assert float(jnp.abs(y - base).max()) > 1e-3  # the adapters do contribute
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)))
    got, ref = grad(qp, g0, lora), grad(dp, g0, lora)
    assert float(jnp.abs(ref[0]).max()) > 1e-3
    assert_close(got, ref, 1e-5)  # g (also_train) and the factors


class SetupWeightContainer(nn.Module):
    """Its ``setup`` makes a weight ``w (8, 8)`` itself and a shared-scope child ``v``."""

    def setup(self):
        self.w = self.param("w", nn.initializers.normal(0.5), (8, 8))
        self.down = Einsum((8, 8), weight_name="v")
        nn.share_scope(self, self.down)

    def __call__(self, x):
        return self.down("...H,HF->...F", x @ self.w)


class SWModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return SetupWeightContainer(name="mix")(x)


def test_linen_setup_container_making_a_quantized_weight_itself_is_refused_by_path():
    params = SWModel().init(jax.random.key(0), XF)["params"]
    wrapped = jax_lora.wrap(SWModel(), jax_lora.LoraConfig(rank=4, alpha=6, targets="mix/(w|v)"))
    qp = quant.quantize(params, "nf4", targets="mix/(w|v)", axis=-1, block=8)
    with pytest.raises(ValueError, match=r"'mix' \(.*SetupWeightContainer\).*`setup` creates"):
        jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qp}, XF)
    # the advice works: its setup weight left float, the child's quantized
    qp = quant.quantize(params, "nf4", targets="mix/v", axis=-1, block=8)
    lora = perturbed(jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qp}, XF))
    on_float = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, XF)
    assert jax.tree.map(jnp.shape, lora) == jax.tree.map(jnp.shape, on_float)  # as on float
    assert "v" in lora["mix"]
    y = wrapped.apply({"params": qp, "lora": lora}, XF)
    assert_close(y, wrapped.apply({"params": quant.dequantize(qp), "lora": lora}, XF), 1e-6)


# ------------------------------------------ 3. NNX: codes and scales under logical axis rules

SHARD_SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import flax.linen as nn, jax, jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_lora
from jax_lora import quant_nnx

D = 128
RULES = (("embed", "data"), ("mlp", "model"))


class Net(nnx.Module):
    def __init__(self, rngs, **meta):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"), **meta)
        self.fc0 = nnx.Linear(D, D, kernel_init=init, rngs=rngs)
        self.fc1 = nnx.Linear(D, D, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        for fc in (self.fc0, self.fc1):
            x = x + fc(jnp.tanh(x))
        return x


x = jax.random.normal(jax.random.key(1), (8, D))
y = jax.random.normal(jax.random.key(2), (8, D))
spec_of = lambda s: [str(a) for a in s]


def run(shape, where, dq):
    n = shape[0] * shape[1]
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=auto, devices=jax.devices()[:n])
    meta = {"sharding_rules": RULES} if where == "variable" else {}
    with nnx.use_eager_sharding(False):
        m, plain = Net(nnx.Rngs(0), **meta), Net(nnx.Rngs(0), **meta)
    jax_lora.wrap(jax_lora.quantize(m, "nf4", double_quant=dq), jax_lora.LoraConfig(rank=4))
    lo = jax.tree.map(lambda t: t + 0.03, jax_lora.lora_state(m))
    jax_lora.load_lora(m, lo)
    graphdef, lo, rest = nnx.split(m, nnx.LoRAParam, ...)
    with nn.logical_axis_rules(RULES if where == "context" else ()):
        if where == "explicit":  # as nn.logical_to_mesh_sharding(spec, mesh, rules) for floats
            spec = quant_nnx.get_partition_spec(rest, mesh, rules=RULES)
            float_spec = nn.logical_to_mesh_sharding(nnx.get_partition_spec(nnx.state(plain)),
                                                     mesh, RULES)
            kernel_spec = float_spec["fc0"]["kernel"].get_value().spec
        else:
            spec = quant_nnx.get_partition_spec(rest, mesh)
            kernel_spec = nnx.get_partition_spec(nnx.state(plain))["fc0"]["kernel"].get_value()
    sh = jax.tree.map(lambda p: NamedSharding(mesh, p), spec, is_leaf=lambda p: isinstance(p, P))
    rest = jax.device_put(rest, sh)

    def loss(lo, rest):
        return jnp.mean((nnx.merge(graphdef, lo, rest)(x) - y) ** 2)

    value, g = jax.jit(jax.value_and_grad(loss), in_shardings=(None, sh))(lo, rest)
    q = rest["fc0"]["kernel"].get_value()
    return {
        "loss": float(value),
        "grad": [float(jnp.abs(t).sum()) for t in jax.tree.leaves(g)],
        "codes_fraction": max(s.data.nbytes for s in q.codes.addressable_shards) / q.codes.nbytes,
        "kernel_spec": spec_of(kernel_spec),
        "codes_spec": spec_of(q.codes.sharding.spec),
        "scales_spec": spec_of(q.scales.sharding.spec),
    }


rows = {f"1x1/{dq}": run((1, 1), "context", dq) for dq in (False, True)}
for w in ("context", "variable", "explicit"):
    for s in ((2, 4), (4, 2)):
        rows[f"{s[0]}x{s[1]}/{w}/False"] = run(s, w, False)
rows["2x4/context/True"] = run((2, 4), "context", True)
print(json.dumps(rows))
"""


def test_nnx_codes_and_scales_take_the_kernels_mesh_axes_under_logical_rules():
    out = subprocess.run(
        [sys.executable, "-c", SHARD_SCRIPT], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    assert rows["1x1/False"]["codes_fraction"] == 1.0
    # `nn.logical_axis_rules`, `nnx.with_partitioning(..., sharding_rules=)`, or `rules=`
    for where in ("context", "variable", "explicit"):
        for mesh in ("2x4", "4x2"):
            row = rows[f"{mesh}/{where}/False"]
            assert row["kernel_spec"] == ["data", "model"]  # the float kernel's mesh axes
            assert row["codes_spec"] == ["data", "model"], row  # the same for the codes
            assert row["codes_fraction"] == 1 / 8, row  # each device: 1/8 of the codes
            assert row["loss"] == pytest.approx(rows["1x1/False"]["loss"], rel=1e-6)
            assert row["grad"] == pytest.approx(rows["1x1/False"]["grad"], rel=1e-5)
        # 2 blocks of scales (2, 128): split over `data` on 2x4, replicated there on 4x2
        assert rows[f"2x4/{where}/False"]["scales_spec"] == ["data", "model"]
        assert rows[f"4x2/{where}/False"]["scales_spec"] == ["None", "model"]
    # double-quantized scales (128 * 2,) flattened out-major: `model` only
    dq = rows["2x4/context/True"]
    assert dq["scales_spec"] == ["model"] and dq["codes_fraction"] == 1 / 8
    assert dq["loss"] == pytest.approx(rows["1x1/True"]["loss"], rel=1e-6)
    assert dq["grad"] == pytest.approx(rows["1x1/True"]["grad"], rel=1e-5)


# ------------------------------------- 2. NNX: quantized kernels of nnx.vmap-stacked layers


class Block(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.fc(x))


class Stack(nnx.Module):
    """Blocks made with ``nnx.vmap`` (kernels ``(L, D, D)``), run with ``nnx.scan``."""

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


def _stack_grads(model, x):
    g = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    return nnx.to_pure_dict(g)


@pytest.mark.parametrize(
    "kw,order", [({}, "quantize_then_wrap"), ({"double_quant": True}, "wrap_then_quantize")]
)
def test_nnx_scanned_stack_of_quantized_kernels_equals_dequantized_float_stack(kw, order):
    n, x = 3, X[0]  # x: (5, D)
    model = Stack(n, nnx.Rngs(0))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8)
    if order == "quantize_then_wrap":
        jax_lora.quantize(model, "nf4", **kw)
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1))
    if order == "wrap_then_quantize":
        jax_lora.quantize(model, "nf4", **kw)
    q = model.blocks.fc.kernel.get_value()
    assert quant.is_quantized(q) and q.shape == (n, D, D) and q.codes.shape == (n, D // 2, D)
    lora = perturbed(jax_lora.lora_state(model))
    assert jax.tree.map(jnp.shape, lora) == {"blocks": {"fc": {"a": (n, D, 4), "b": (n, 4, D)}}}
    jax_lora.load_lora(model, lora)
    dense = jax_lora.dequantize(nnx.clone(model))  # the float stack with the same values
    kernel = dense.blocks.fc.kernel[...]
    assert kernel.shape == (n, D, D)
    want = x  # the same stack unrolled, per layer: base + scale * x @ a @ b
    for i in range(n):
        k = kernel[i] + 2.0 * lora["blocks"]["fc"]["a"][i] @ lora["blocks"]["fc"]["b"][i]
        want = want + jnp.tanh(want @ k + dense.blocks.fc.bias[...][i][None])
    y = nnx.jit(lambda m, x: m(x))(model, x)
    assert y.shape == (5, D)
    assert_close(y, want, 1e-5)
    assert_close(y, dense(x), 1e-6)
    g, g_dense = nnx.jit(_stack_grads)(model, x), _stack_grads(dense, x)
    assert all(float(jnp.abs(g["blocks"]["fc"]["lora_b"][i]).max()) > 0 for i in range(n))
    assert_close(g, g_dense, 1e-5)
    with jax_lora.disabled():
        assert_close(model(x), dense(x), 1e-6)


# ------------------- 5. NNX: custom weights of nnx.vmap-stacked layers run with nnx.scan


class CustomW(nnx.Module):
    """A user's layer: its own ``w: (out, in)`` used as ``x @ w.T``."""

    def __init__(self, rngs):
        self.w = nnx.Param(0.2 * jax.random.normal(rngs.params(), (D, D)))

    def __call__(self, x):
        return x @ self.w[...].T


class CBlock(nnx.Module):
    def __init__(self, rngs):
        self.c = CustomW(rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.c(x))


class CStack(Stack):
    def __init__(self, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return CBlock(rngs)

        self.blocks = create(rngs)


def test_nnx_scanned_stack_of_custom_weights_gets_per_layer_factors():
    n, x = 3, X[0]
    model = CStack(n, nnx.Rngs(0))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets=["blocks/c/w"])
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1), example=(x,))
    lora = perturbed(jax_lora.lora_state(model))  # one (in, r), (r, out) pair per layer
    assert jax.tree.map(jnp.shape, lora) == {
        "blocks": {"c": {"w": {"a": (n, D, 4), "b": (n, 4, D)}}}
    }
    jax_lora.load_lora(model, lora)
    w, a, b = model.blocks.c.w[...], lora["blocks"]["c"]["w"]["a"], lora["blocks"]["c"]["w"]["b"]
    want = x  # per layer: x @ w_i.T + 2 * x @ a_i @ b_i
    for i in range(n):
        want = want + jnp.tanh(want @ w[i].T + 2.0 * (want @ a[i]) @ b[i])
    y = nnx.jit(lambda m, x: m(x))(model, x)
    assert_close(y, want, 1e-5)
    assert_close(jax_lora.merge(model)(x), want, 1e-5)
    g = _stack_grads(model, x)["blocks"]["c"]
    assert g["w_lora_a"].shape == (n, D, 4)
    assert all(float(jnp.abs(g["w_lora_b"][i]).max()) > 0 for i in range(n))
    # on a quantized base (either order): the model holding the dequantized weights
    for order in ("quantize_then_wrap", "wrap_then_quantize"):
        qm = CStack(n, nnx.Rngs(0))
        qkw = {"targets": "blocks/c/w", "axis": -1, "block": 16}
        if order == "quantize_then_wrap":
            jax_lora.quantize(qm, "nf4", **qkw)
        jax_lora.wrap(qm, cfg, rngs=nnx.Rngs(1), example=(x,))
        if order == "wrap_then_quantize":
            jax_lora.quantize(qm, "nf4", **qkw)
        assert quant.is_quantized(qm.blocks.c.w.get_value())
        jax_lora.load_lora(qm, lora)
        dense = jax_lora.dequantize(nnx.clone(qm))
        assert_close(nnx.jit(lambda m, x: m(x))(qm, x), dense(x), 1e-6)
        assert_close(nnx.jit(_stack_grads)(qm, x), _stack_grads(dense, x), 1e-5)


def test_nnx_scanned_stack_of_custom_weights_with_dropout():
    """One dropout stream per stacked layer (keys ``(n,)``): masks differ between calls, and
    eval equals the model without dropout."""
    n, x = 3, X[0]
    model = CStack(n, nnx.Rngs(0))
    ref = CStack(n, nnx.Rngs(0))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets=["blocks/c/w"])
    jax_lora.wrap(model, dataclasses.replace(cfg, dropout=0.5), rngs=nnx.Rngs(1), example=(x,))
    jax_lora.wrap(ref, cfg, rngs=nnx.Rngs(1), example=(x,))
    lora = perturbed(jax_lora.lora_state(model))
    jax_lora.load_lora(model, lora)
    jax_lora.load_lora(ref, lora)
    assert model.blocks.c.lora_rngs.key[...].shape == (n,)
    y1, y2 = model(x), model(x)
    assert float(jnp.abs(y1 - y2).max()) > 1e-3 and float(jnp.abs(y1 - ref(x)).max()) > 1e-3
    model.eval()
    assert_close(model(x), ref(x), 1e-6)


def test_nnx_stack_along_a_non_leading_axis_is_refused_by_path():
    n, x = 3, X[0]

    class Mid(nnx.Module):  # layers stacked along axis 1 of each weight: (D, n, D)
        def __init__(self, rngs):
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=(0,), out_axes=1)
            def create(rngs):
                return CBlock(rngs)

            self.blocks = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 1), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)

    model = Mid(nnx.Rngs(0))
    assert model.blocks.c.w.shape == (D, n, D)
    cfg = jax_lora.LoraConfig(rank=4, targets=["blocks/c/w"])
    with pytest.raises(ValueError, match=r"'blocks/c/w' has shape \(64, 3, 64\).*\(64, 64\)"):
        jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1), example=(x,))
    assert not jax_lora.nnx.is_adapted(model.blocks.c)  # a refused wrap leaves it as it was
