"""Adversary, third wave: the quantized-base leftovers (``also_train`` next to a `QArray`),
NNX stacks of custom weights run with ``nnx.scan``, and the lazy ``jax_lora`` names.

References are independent: the stack unrolled by hand (``x + tanh(x @ w_i.T + s * x @ a_i @
b_i)`` per layer) and the factors read back from the files; fp32, tolerances relative to the
largest reference value (`_check.assert_close`).
"""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _check import assert_close, perturbed
from flax import nnx

import jax_lora
from jax_lora import quant

D = 16
X = jax.random.normal(jax.random.key(1), (5, D))


def _perturbed(tree):
    return perturbed(tree, seed=3)


@pytest.fixture(autouse=True)
def _standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax and nnx internals
        yield


# ----------------------------------------- 1. also_train that reaches a quantized weight


class LTwo(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(D, name="head")(jnp.tanh(nn.Dense(D, name="fc")(x)))


class NTwo(nnx.Module):
    def __init__(self, rngs):
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.fc(x)))


def _linen_quantized():
    wrapped = jax_lora.wrap(LTwo(), jax_lora.LoraConfig(rank=4, targets="fc"))
    v = wrapped.init(jax.random.key(0), X)
    return {"params": quant.quantize(v["params"], "nf4", targets="fc", block=16), "lora": v["lora"]}


def _nnx_quantized():
    m = NTwo(nnx.Rngs(0))
    jax_lora.quantize(m, "nf4", targets="fc", block=16)
    jax_lora.wrap(m, jax_lora.LoraConfig(rank=4, targets="fc"), rngs=nnx.Rngs(1))
    return nnx.state(m, nnx.Param)


@pytest.mark.parametrize("pattern", ["fc/.*", "fc/kernel", "fc/kernel/codes", ".*"])
@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_also_train_reaching_a_quantized_weight_is_refused_by_path(kind, pattern):
    """Adam on the nf4 codes failed deep in optax (linen: "ufunc 'power' not supported"; NNX:
    Adam state built for the codes); 'fc/kernel' said "matches no param" and listed
    'fc/kernel/codes' as a candidate. Now: refused, naming the quantized weight."""
    tree = _linen_quantized() if kind == "linen" else _nnx_quantized()
    if kind == "nnx" and pattern == "fc/kernel/codes":  # NNX paths end at the Variable
        pattern = "fc/kernel"
    before = jax.tree.map(lambda x: x, tree)
    with pytest.raises(ValueError, match=r"quantized weight 'fc/kernel' \(nf4, shape \(16, 16\)"):
        jax_lora.optimizer(optax.adam(1e-2), also_train=pattern).init(tree)
    with pytest.raises(ValueError, match=r"quantized weight 'fc/kernel'"):
        jax_lora.trainable_mask(tree, also_train=pattern)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), tree, before))


def test_also_train_reaching_double_quant_statistics_is_refused():
    """The double-quant fields (``scales_scale``, ``scales_offset``) are arrays of the `QArray`
    too: a pattern that also matches a float param used to train them."""
    wrapped = jax_lora.wrap(LTwo(), jax_lora.LoraConfig(rank=4, targets="fc"))
    v = wrapped.init(jax.random.key(0), X)
    qp = quant.quantize(v["params"], "nf4", targets="fc", block=16, double_quant=True)
    tree = {"params": qp, "lora": v["lora"]}
    assert qp["fc"]["kernel"].scales_scale is not None
    with pytest.raises(ValueError, match=r"quantized weight 'fc/kernel' \(nf4"):
        jax_lora.trainable_mask(tree, also_train=r"head/bias|fc/kernel/scales_scale")


@pytest.mark.parametrize("kind", ["linen", "nnx"])
def test_also_train_bias_of_a_quantized_layer_gets_state_and_the_codes_none(kind):
    tree = _linen_quantized() if kind == "linen" else _nnx_quantized()
    state = jax_lora.optimizer(optax.adam(1e-2), also_train="fc/bias").init(tree)
    sizes = sorted(x.size for x in jax.tree.leaves(state) if x.ndim)
    # mu and nu of: fc/bias (D,), a (D, 4), b (4, D); nothing for codes/scales or head
    assert sizes == sorted([D, D, 4 * D, 4 * D, 4 * D, 4 * D])


class SetupW(nn.Module):
    """A ``setup`` container: its own weight ``w (8, 8)`` and a shared-scope child's ``v``."""

    def setup(self):
        self.w = self.param("w", nn.initializers.normal(0.5), (8, 8))
        self.down = EinsumV()
        nn.share_scope(self, self.down)

    def __call__(self, x):
        return self.down(x @ self.w)


class EinsumV(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.einsum("...H,HF->...F", x, self.param("v", nn.initializers.normal(0.5), (8, 8)))


class SetupWModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return SetupW(name="mix")(x)


@pytest.mark.parametrize("qtype,block", [("int8", None), ("nf4", 8)])
def test_linen_setup_weight_quantized_as_int8_is_refused_like_nf4(qtype, block):
    """int8 codes have the weight's shape, so flax's shape check in ``setup`` passed and the
    container's call met the `QArray` itself: "unsupported operand type(s) for @"."""
    xf = jax.random.normal(jax.random.key(4), (2, 5, 8))
    params = SetupWModel().init(jax.random.key(0), xf)["params"]
    wrapped = jax_lora.wrap(SetupWModel(), jax_lora.LoraConfig(rank=4, targets="mix/(w|v)"))
    kw = {} if block is None else {"block": block}
    qp = quant.quantize(params, qtype, targets="mix/(w|v)", axis=-1, **kw)
    with pytest.raises(ValueError, match=r"'mix' \(.*SetupW\).*`setup` creates"):
        jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qp}, xf)
    qp = quant.quantize(params, qtype, targets="mix/v", axis=-1, **kw)  # the advice works
    lora = _perturbed(jax_lora.init_lora(wrapped, jax.random.key(1), {"params": qp}, xf))
    assert jax.tree.map(jnp.shape, lora) == {"mix": {"v": {"a": (8, 4), "b": (4, 8)}}}
    y = wrapped.apply({"params": qp, "lora": lora}, xf)
    assert_close(y, wrapped.apply({"params": quant.dequantize(qp), "lora": lora}, xf), 1e-6)


# ----------------------- 2. NNX: custom weights of nnx.vmap stacks, 2 stack axes, PEFT files


class CustomW(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(0.2 * jax.random.normal(rngs.params(), (D, D)))

    def __call__(self, x):
        return x @ self.w[...].T


class CBlock(nnx.Module):
    def __init__(self, rngs):
        self.c = CustomW(rngs)

    def __call__(self, x):
        return x + jnp.tanh(self.c(x))


class Grid(nnx.Module):
    """Layers stacked along two axes ``(2, 3, D, D)`` (nested ``nnx.vmap``), run by nested
    ``nnx.scan``: six layers in row-major order."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=2)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def outer(rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def inner(rngs):
                return CBlock(rngs)

            return inner(rngs)

        self.blocks = outer(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def rows(x, row):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def cols(x, block):
                return block(x)

            return cols(x, row)

        return rows(x, self.blocks)


def test_nnx_stack_with_two_stack_axes_gets_per_layer_factors_and_streams():
    model = Grid(nnx.Rngs(0))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets="blocks/c/w", dropout=0.3)
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1), example=(X,))
    lora = _perturbed(jax_lora.lora_state(model))
    f = lora["blocks"]["c"]["w"]
    assert (f["a"].shape, f["b"].shape) == ((2, 3, D, 4), (2, 3, 4, D))
    assert model.blocks.c.lora_rngs.key[...].shape == (2, 3)
    jax_lora.load_lora(model, lora)
    w, a, b = (t.reshape(6, *t.shape[2:]) for t in (model.blocks.c.w[...], f["a"], f["b"]))
    want = X
    for i in range(6):
        want = want + jnp.tanh(want @ w[i].T + 2.0 * (want @ a[i]) @ b[i])
    model.eval()
    assert_close(model(X), want, 1e-5)
    assert_close(jax_lora.merge(model)(X), want, 1e-5)
    model.train()
    y1, y2 = model(X), model(X)
    assert float(jnp.abs(y1 - y2).max()) > 1e-3  # fresh dropout masks per call


def test_nnx_scanned_custom_weight_stack_round_trips_through_peft_files(tmp_path):
    class CStack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return CBlock(rngs)

            self.blocks = create(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, block):
                return block(x)

            return body(x, self.blocks)

    model = CStack(nnx.Rngs(0))
    cfg = jax_lora.LoraConfig(rank=4, alpha=8, targets="blocks/c/w")
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1), example=(X,))
    lora = _perturbed(jax_lora.lora_state(model))
    with pytest.raises(ValueError, match=r"'blocks/c/w'.*\(3, 16, 4\).*stacked="):
        jax_lora.export_peft(tmp_path / "x", lora, cfg)  # a stack is not guessed
    jax_lora.export_peft(tmp_path / "p", lora, cfg, stacked={"blocks": "layers/{i}"})
    back, _ = jax_lora.import_peft(tmp_path / "p", like=lora, stacked={"blocks": "layers/{i}"})
    assert_close(back, lora, 0.0)


# --------------------------------------------------------- 3. the lazy jax_lora names


def test_lazy_names_star_import_dir_and_missing_attribute():
    code = (
        "import sys, jax_lora\n"
        "assert 'orbax.checkpoint' not in sys.modules\n"
        "assert set(jax_lora.__all__) <= set(dir(jax_lora))\n"
        "assert not hasattr(jax_lora, 'nope')\n"
        "ns = {}\n"
        "exec('from jax_lora import *', ns)\n"
        "assert set(jax_lora.__all__) <= set(ns), set(jax_lora.__all__) - set(ns)\n"
        "import pickle\n"
        "assert pickle.loads(pickle.dumps(jax_lora.AdapterCheckpointer)) is ns['AdapterCheckpointer']\n"
        "assert jax_lora.peft.export_peft is jax_lora.export_peft\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


# ---------------------------- 4. quant_nnx.get_partition_spec(rules=) and a Variable's rules


@pytest.mark.parametrize(
    "local,rules",
    [
        ((("embed", "data"), ("mlp", "model")), (("embed", "data"), ("mlp", "model"))),
        ((("embed", "data"),), (("mlp", "model"),)),  # each names one axis
    ],
)
def test_partition_spec_rules_compose_with_a_variables_own_sharding_rules(local, rules):
    """``rules=`` was applied to the names the Variable's own ``sharding_rules`` had already
    mapped to mesh axes ('data', 'model'), which no rule names: every spec came back
    ``P(None, None)``, the codes silently replicated."""
    from jax_lora import quant_nnx

    init = nnx.with_partitioning(
        nnx.initializers.lecun_normal(), ("embed", "mlp"), sharding_rules=local
    )
    with nnx.use_eager_sharding(False):
        m = nnx.Linear(64, 64, kernel_init=init, rngs=nnx.Rngs(0))
    jax_lora.quantize(m, "nf4")
    spec = quant_nnx.get_partition_spec(nnx.state(m), rules=rules)["kernel"].get_value()
    want = jax.sharding.PartitionSpec("data", "model")
    assert (spec.codes, spec.scales) == (want, want)


def test_partition_spec_rules_compose_with_context_rules():
    from jax_lora import quant_nnx

    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))
    with nnx.use_eager_sharding(False):
        m = nnx.Linear(64, 64, kernel_init=init, rngs=nnx.Rngs(0))
    jax_lora.quantize(m, "nf4")
    with nn.logical_axis_rules((("embed", "data"),)):
        spec = quant_nnx.get_partition_spec(nnx.state(m), rules=(("mlp", "model"),))
    want = jax.sharding.PartitionSpec("data", "model")
    assert spec["kernel"].get_value().codes == want


def test_dir_lists_the_lazy_submodules_without_importing_them():
    """``jax_lora.checkpoint``/``.peft`` are attributes (PEP 562) but ``dir`` (tab completion)
    did not list them until first use."""
    code = (
        "import sys, jax_lora\n"
        "d = dir(jax_lora)\n"
        "print('checkpoint' in d, 'peft' in d, 'orbax.checkpoint' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=".")
    assert out.stdout.split() == ["True", "True", "False"], out.stderr[-2000:]
