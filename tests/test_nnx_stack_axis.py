"""NNX layers stacked by ``nnx.vmap`` along a non-leading axis (``out_axes=k``).

``nnx.vmap`` leaves no record of ``out_axes``: a stack of ``D`` layers of ``Linear(D, D)`` has a
``(D, D, D)`` kernel whichever axis holds the layers. The wrap reads the axis off the shape where
only one fits, takes it from ``stack_axis=``, and refuses to guess otherwise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _check import assert_close
from flax import nnx

import jax_lora
from jax_lora import LoraConfig

TOL = 1e-5  # relative, fp32 (same math, different contraction order)


class Block(nnx.Module):
    def __init__(self, d_in, d_out, rngs):
        self.fc = nnx.Linear(d_in, d_out, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.fc(x))


class Stack(nnx.Module):
    """``n`` blocks made by ``nnx.vmap(out_axes=axis)``, run by ``nnx.scan(in_axes=axis)``."""

    def __init__(self, n, d_in, d_out, axis, rngs):
        self.axis = axis

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=axis)
        def create(rngs):
            return Block(d_in, d_out, rngs)

        self.blocks = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def _random_lora(model):
    return jax.tree.map(
        lambda t: 0.3 * jax.random.normal(jax.random.key(t.size), t.shape),
        jax_lora.lora_state(model),
    )


def _reference(kernel, bias, lora, x, axis, n):
    """The stack unrolled, layer ``i`` taken from axis ``axis`` of the stored float arrays, the
    stack-first factors of ``lora`` folded in at scale 1 (alpha = rank)."""
    for i in range(n):
        k = jnp.take(kernel, i, axis=axis) + lora["a"][i] @ lora["b"][i]
        x = jnp.tanh(x @ k + jnp.take(bias, i, axis=min(axis, bias.ndim - 1))[None])
    return x


def _check_against_reference(model, axis, n, x):
    lora = _random_lora(model)
    jax_lora.load_lora(model, lora)
    assert jax.tree.all(jax.tree.map(np.array_equal, jax_lora.lora_state(model), lora))
    kernel, bias = model.blocks.fc.kernel[...], model.blocks.fc.bias[...]
    node = lora["blocks"]["fc"]
    want = _reference(kernel, bias, node, x, axis, n)
    assert_close(model(x), want, TOL)
    assert_close(jax_lora.merge(model)(x), want, TOL)
    # grads per layer: the model's (stored layout, back to stack-first) vs the reference's
    g = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    k = getattr(model.blocks.fc, "lora_stack_axis", 0)
    got = {t: jnp.moveaxis(g["blocks"]["fc"][f"lora_{t}"][...], k, 0) for t in "ab"}
    ref = jax.grad(lambda f: jnp.sum(_reference(kernel, bias, f, x, axis, n) ** 2))(dict(node))
    for t in "ab":
        assert got[t].shape == node[t].shape
        assert_close(got[t], ref[t], TOL)
        assert all(np.abs(np.asarray(ref[t][i])).max() > 0 for i in range(n))


def test_ambiguous_stack_refuses_to_guess():
    # bug: D layers of Linear(D, D) stacked along axis 1 passed the shape check, the factors were
    # stacked along axis 0 and the scan sliced them along axis 1: silently wrong outputs
    model = Stack(4, 4, 4, 1, nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(
        ValueError,
        match=r"'blocks/fc' has shape \(4, 4, 4\), one layer's is \(4, 4\).*axis 0 or axis 1 or "
        r"axis 2.*stack_axis=",
    ):
        jax_lora.wrap(model, LoraConfig(rank=4))
    after = jax.tree.map(np.asarray, nnx.state(model))  # the model is left as it was
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    assert type(model.blocks.fc) is nnx.Linear


@pytest.mark.parametrize("axis", [1, -1])
def test_explicit_stack_axis_matches_per_layer_reference(axis):
    n = d = 4  # rank 4 too: every factor axis has the stack's length
    model = Stack(n, d, d, axis, nnx.Rngs(0))
    jax_lora.wrap(model, LoraConfig(rank=4), rngs=nnx.Rngs(1), stack_axis=axis)
    assert model.blocks.fc.lora_a.shape == (d, n, 4) if axis == 1 else (d, 4, n)
    assert jax.tree.map(jnp.shape, jax_lora.lora_state(model)) == {
        "blocks": {"fc": {"a": (n, d, 4), "b": (n, 4, d)}}
    }
    _check_against_reference(model, axis % 3, n, jax.random.normal(jax.random.key(2), (3, d)))


def test_unambiguous_non_leading_stack_is_read_off_the_shape():
    # kernel (8, 3, 8): only axis 1 leaves (8, 8). Refused before (expected stack first).
    n, d = 3, 8
    model = Stack(n, d, d, 1, nnx.Rngs(0))
    jax_lora.wrap(model, LoraConfig(rank=2), rngs=nnx.Rngs(1))
    assert model.blocks.fc.lora_a.shape == (d, n, 2)
    assert model.blocks.fc.lora_b.shape == (2, n, d)
    _check_against_reference(model, 1, n, jax.random.normal(jax.random.key(2), (5, d)))


@pytest.mark.parametrize(("n", "stack_axis"), [(3, None), (4, 0)])
def test_leading_stacks_keep_working(n, stack_axis):
    """The default layout: stack-first factors (for n == D only with ``stack_axis=0``)."""
    d = 4
    model = Stack(n, d, d, 0, nnx.Rngs(0))
    jax_lora.wrap(model, LoraConfig(rank=2), rngs=nnx.Rngs(1), stack_axis=stack_axis)
    assert model.blocks.fc.lora_a.shape == (n, d, 2)
    assert not hasattr(model.blocks.fc, "lora_stack_axis")
    _check_against_reference(model, 0, n, jax.random.normal(jax.random.key(2), (3, d)))


def test_stack_axis_that_does_not_fit_is_refused():
    model = Stack(3, 8, 8, 1, nnx.Rngs(0))  # kernel (8, 3, 8)
    with pytest.raises(
        ValueError, match=r"'blocks/fc' has shape \(8, 3, 8\).*`stack_axis=0`.*axis 1"
    ):
        jax_lora.wrap(model, LoraConfig(rank=2), stack_axis=0)
    with pytest.raises(TypeError, match=r"`stack_axis` must be an int.*\(1,\)"):
        jax_lora.wrap(model, LoraConfig(rank=2), stack_axis=(1,))
    assert type(model.blocks.fc) is nnx.Linear


def test_dora_on_a_non_leading_stack_starts_at_the_base_and_merges():
    n = d = 4
    x = jax.random.normal(jax.random.key(2), (3, d))
    model = Stack(n, d, d, 1, nnx.Rngs(0))
    base = model(x)
    cfg = LoraConfig(rank=2, use_dora=True)
    jax_lora.wrap(model, cfg, rngs=nnx.Rngs(1), stack_axis=1)
    assert model.blocks.fc.lora_m.shape == (d, n)  # (out, L): stacked as nnx.vmap would
    m = jax_lora.lora_state(model)["blocks"]["fc"]["m"]  # stack-first: (L, out)
    want_m = jnp.linalg.norm(jnp.moveaxis(model.blocks.fc.kernel[...], 1, 0), axis=1)
    assert_close(m, want_m, 1e-6)
    assert_close(model(x), base, 1e-6)  # at init: m = ‖W‖ per layer, b = 0
    lora = jax.tree.map(lambda t: t + 0.1, jax_lora.lora_state(model))
    jax_lora.load_lora(model, lora)
    assert_close(jax_lora.merge(model)(x), model(x), TOL)
    unmerged = jax_lora.unmerge(jax_lora.merge(model), model)
    assert_close(unmerged.blocks.fc.kernel[...], model.blocks.fc.kernel[...], TOL)


class Custom(nnx.Module):
    """A layer with its own weight (roles read off a call)."""

    def __init__(self, d, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (d, d)))

    def __call__(self, x):
        return jnp.tanh(x @ self.w[...])


class CustomStack(nnx.Module):
    def __init__(self, n, d, axis, rngs):
        self.axis = axis

        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=axis)
        def create(rngs):
            return Custom(d, rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, self.axis), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return body(x, self.layers)


def test_custom_weight_stacks_refuse_to_guess():
    x = jnp.ones((2, 4))
    cfg = LoraConfig(rank=2, targets=["layers/w"])
    with pytest.raises(ValueError, match=r"'layers/w' has shape \(4, 4, 4\).*stack_axis="):
        jax_lora.wrap(CustomStack(4, 4, 1, nnx.Rngs(0)), cfg, example=(x,))
    with pytest.raises(ValueError, match=r"'layers/w'.*leading axes only"):
        jax_lora.wrap(CustomStack(4, 4, 1, nnx.Rngs(0)), cfg, example=(x,), stack_axis=1)
    model = jax_lora.wrap(CustomStack(4, 4, 0, nnx.Rngs(0)), cfg, example=(x,), stack_axis=0)
    assert model.layers.w_lora_a.shape == (4, 4, 2)


def test_named_adapters_refuse_a_non_leading_stack():
    # named adapters store the factors stack-first: a scan along axis 1 would slice them wrong
    model = Stack(3, 8, 8, 1, nnx.Rngs(0))
    cfg = LoraConfig(rank=2)
    with pytest.raises(ValueError, match=r"'blocks/fc'.*stacked along axis 1.*leading"):
        jax_lora.wrap(model, {"one": cfg, "two": cfg})
    assert type(model.blocks.fc) is nnx.Linear


def test_factors_of_a_non_leading_stack_inherit_partitioning_at_the_stack_axis():
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp"))

    class PBlock(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(8, 8, kernel_init=init, rngs=rngs)

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=1, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return PBlock(rngs)

    with nnx.use_eager_sharding(False):
        model = create(nnx.Rngs(0))
        jax_lora.wrap(model, LoraConfig(rank=2, use_dora=True), rngs=nnx.Rngs(1))
    spec = nnx.get_partition_spec(nnx.state(model, nnx.LoRAParam))
    P = jax.sharding.PartitionSpec
    assert model.fc.kernel.shape == (8, 3, 8)
    assert spec["fc"]["lora_a"].get_value() == P("embed", "layers", None)
    assert spec["fc"]["lora_b"].get_value() == P(None, "layers", "mlp")
    assert spec["fc"]["lora_m"].get_value() == P("mlp", "layers")


class StackDrop(Stack):
    """A non-leading stack with LoRA dropout: the per-layer dropout keys are scalars, so their
    stream is stacked along axis 0; the scan slices ``nnx.RngState`` there."""

    def __call__(self, x):
        axes = nnx.StateAxes({nnx.RngState: 0, ...: self.axis})

        @nnx.scan(in_axes=(nnx.Carry, axes), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(x, self.blocks)


def test_dropout_on_a_non_leading_stack():
    x = jax.random.normal(jax.random.key(2), (2, 8))
    model = StackDrop(3, 8, 8, 1, nnx.Rngs(0))
    jax_lora.wrap(model, LoraConfig(rank=2, dropout=0.5), rngs=nnx.Rngs(1))
    ref = jax_lora.wrap(StackDrop(3, 8, 8, 1, nnx.Rngs(0)), LoraConfig(rank=2), rngs=nnx.Rngs(1))
    assert model.blocks.fc.lora_rngs.key[...].shape == (3,)
    lora = jax.tree.map(lambda t: t + 0.3, jax_lora.lora_state(model))
    jax_lora.load_lora(model, lora)
    jax_lora.load_lora(ref, lora)
    y1, y2 = model(x), model(x)
    assert np.abs(np.asarray(y1 - y2)).max() > 1e-3  # masks differ between calls
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(ref(x)))
