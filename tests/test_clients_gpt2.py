"""jax_lora on a model it does not know: Hugging Face's ``FlaxGPT2LMHeadModel``.

GPT-2's projections are transformers' own ``FlaxConv1D`` (kernel stored ``(out, in)``, used
through ``lax.dot_general`` on the transpose) and its head is tied to the token embedding, so
nothing here is a flax ``Dense``. The reference is PEFT on torch's ``GPT2LMHeadModel`` with
the same weights (explicit conversion table below) and the same factor values.

transformers' Flax code relies on standard dtype promotion and rank broadcasting, so every
call into it runs inside `hf_numerics` (the rest of the suite stays strict).
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _check import assert_close

import jax_lora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

RANK, ALPHA = 4, 8.0
N_LAYER, D, VOCAB, T = 2, 32, 64, 8
TARGETS = [r".*/c_attn", r".*/c_proj", r".*/c_fc"]
# Every weight GPT-2 feeds to a matmul, except the embeddings and the tied head.
ADAPTED = sorted(
    f"transformer/h/{i}/{layer}/kernel"
    for i in range(N_LAYER)
    for layer in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")
)
# FlaxConv1D kernel (out, in): a (in, r), b (r, out).
SHAPES = {
    "attn/c_attn": ((D, RANK), (RANK, 3 * D)),
    "attn/c_proj": ((D, RANK), (RANK, D)),
    "mlp/c_fc": ((D, RANK), (RANK, 4 * D)),
    "mlp/c_proj": ((4 * D, RANK), (RANK, D)),
}


@contextlib.contextmanager
def hf_numerics() -> Iterator[None]:
    """transformers' Flax GPT-2 mixes int and float arrays and broadcasts ranks implicitly."""
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        yield


def torch_name(path: str) -> str:
    """``transformer/h/0/attn/c_attn/kernel`` -> ``transformer.h.0.attn.c_attn``."""
    return re.sub(r"/kernel$", "", path).replace("/", ".")


def flax_path(name: str) -> str:
    return name.replace(".", "/") + "/kernel"


def factor_paths(lora: Any, prefix: str = "") -> dict[str, dict[str, Any]]:
    """``{"/"-joined path: {"a", "b"}}`` for every factor pair in a ``lora`` tree."""
    if set(lora) == {"a", "b"}:
        return {prefix: lora}
    out = {}
    for k, v in lora.items():
        out.update(factor_paths(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


def random_factors(lora: Any, seed: int = 1) -> Any:
    """Nonzero factors (b too) so that every adapter changes the output."""
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            0.2 * jax.random.normal(k, x.shape, jnp.float32)
            for k, x in zip(keys, leaves, strict=True)
        ],
    )


def to_torch_state(params: Any) -> dict[str, Any]:
    """Flax GPT-2 params -> torch ``GPT2LMHeadModel`` state dict, by an explicit table."""
    flat = {"/".join(k): np.asarray(v) for k, v in _flatten(params)}
    state = {}
    for path, value in flat.items():
        *module, leaf = path.split("/")
        # FlaxConv1D kernel is (out, in), torch Conv1D weight is (in, out)
        rename = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
        name = ".".join([*module, rename[leaf]])
        state[name] = value.T if leaf == "kernel" else value
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, (*prefix, str(k)))
        else:
            yield (*prefix, str(k)), v


@pytest.fixture(scope="module")
def gpt2():
    """(linen module, params, call args, torch model) for a tiny random GPT-2."""
    cfg = transformers.GPT2Config(
        n_layer=N_LAYER, n_embd=D, n_head=4, vocab_size=VOCAB, n_positions=32
    )
    with hf_numerics():
        flax_model = transformers.FlaxGPT2LMHeadModel(cfg, seed=0, dtype=jnp.float32)
    params = jax.tree.map(jnp.asarray, flax_model.params)
    torch_model = transformers.GPT2LMHeadModel(cfg)
    state = to_torch_state(params)
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    assert got == want  # every tensor present, every shape right
    torch_model.load_state_dict(state, strict=True)
    torch_model.eval()
    ids = np.random.default_rng(0).integers(0, VOCAB, (2, T)).astype(np.int32)
    args = (
        jnp.asarray(ids),
        jnp.ones((2, T), jnp.int32),
        jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (2, T)),
    )
    return flax_model.module, params, args, torch_model


def run(module: Any, variables: Any, args: tuple) -> jax.Array:
    with hf_numerics():
        return module.apply(variables, *args, deterministic=True).logits


def torch_logits(model: Any, args: tuple) -> Any:
    ids, mask, pos = (torch.from_numpy(np.asarray(x, np.int64)) for x in args)
    return model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def adapt(module: Any, params: Any, args: tuple, targets: Any) -> tuple[Any, Any, Any]:
    config = jax_lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets)
    wrapped = jax_lora.wrap(module, config)
    with hf_numerics():
        lora = jax_lora.init_lora(
            wrapped, jax.random.key(0), {"params": params}, *args, deterministic=True
        )
    return config, wrapped, lora


def peft_with(torch_model: Any, lora: Any) -> Any:
    """PEFT on a copy of ``torch_model`` with exactly the factor values of ``lora``."""
    cfg = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    model = peft.get_peft_model(copy.deepcopy(torch_model), cfg)
    adapted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    )
    assert adapted == sorted(torch_name(p) for p in factor_paths(lora))
    with torch.no_grad():
        for path, ab in factor_paths(lora).items():
            layer = model.get_submodule("base_model.model." + torch_name(path))
            # PEFT lora_A.weight (r, in) = a.T, lora_B.weight (out, r) = b.T
            layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(ab["a"]).T.copy()))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(ab["b"]).T.copy()))
    return model


def test_weight_conversion_matches_torch(gpt2):
    module, params, args, torch_model = gpt2
    with torch.no_grad():
        want = torch_logits(torch_model, args).numpy()
    got = run(module, {"params": params}, args)
    assert got.shape == (2, T, VOCAB)
    assert_close(got, want, 1e-5)


def test_module_targets_adapt_conv1d_kernels_and_zero_b_is_base(gpt2):
    module, params, args, _ = gpt2
    _, wrapped, lora = adapt(module, params, args, TARGETS)
    flat = factor_paths(lora)
    assert sorted(flat) == ADAPTED
    for path, ab in flat.items():
        layer = re.search(r"h/\d+/(.*)/kernel$", path)[1]
        assert (ab["a"].shape, ab["b"].shape) == SHAPES[layer], path
        assert ab["a"].dtype == ab["b"].dtype == jnp.float32
        assert float(jnp.abs(ab["a"]).max()) > 0 and not jnp.any(ab["b"])
    base = run(module, {"params": params}, args)
    got = run(wrapped, {"params": params, "lora": lora}, args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))


def test_parity_with_peft_logits_and_factor_grads(gpt2):
    module, params, args, torch_model = gpt2
    _, wrapped, lora = adapt(module, params, args, TARGETS)
    lora = random_factors(lora)
    probe = jax.random.normal(jax.random.key(2), (2, T, VOCAB), jnp.float32)

    def loss(lora):
        return jnp.sum(run(wrapped, {"params": params, "lora": lora}, args) * probe)

    got_logits = run(wrapped, {"params": params, "lora": lora}, args)
    grads = jax.grad(loss)(lora)

    model = peft_with(torch_model, lora)
    want_logits = torch_logits(model, args)
    (want_logits * torch.from_numpy(np.array(probe))).sum().backward()
    base = run(module, {"params": params}, args)
    # The adapters really move the output, so the parity below is not the base's parity.
    assert float(jnp.abs(got_logits - base).max()) > 1e-2
    assert_close(got_logits, want_logits.detach().numpy(), 1e-5)
    for path, g in factor_paths(grads).items():
        layer = model.get_submodule("base_model.model." + torch_name(path))
        want_a = layer.lora_A["default"].weight.grad.numpy().T
        want_b = layer.lora_B["default"].weight.grad.numpy().T
        assert_close(g["a"], want_a, 1e-5)
        assert_close(g["b"], want_b, 1e-5)


def test_all_weights_with_tied_head(gpt2):
    module, params, args, _ = gpt2
    _, wrapped, lora = adapt(module, params, args, None)
    assert sorted(factor_paths(lora)) == ADAPTED  # not wte/wpe, not the tied head
    base = run(module, {"params": params}, args)
    got = run(wrapped, {"params": params, "lora": lora}, args)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(base))
    moved = run(wrapped, {"params": params, "lora": random_factors(lora)}, args)
    assert moved.shape == (2, T, VOCAB) and float(jnp.abs(moved - base).max()) > 1e-2


def test_merge_keeps_conv1d_layout_and_matches_unmerged(gpt2):
    module, params, args, _ = gpt2
    config, wrapped, lora = adapt(module, params, args, TARGETS)
    lora = random_factors(lora)
    variables = {"params": params, "lora": lora}
    with hf_numerics():
        merged = jax_lora.merge(variables, wrapped, *args, deterministic=True)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, params)
    for path, ab in factor_paths(lora).items():
        w = params
        m = merged
        for k in path.split("/"):
            w, m = w[k], m[k]
        # stored (out, in): the update is (a @ b).T
        want = np.asarray(w) + config.scale * (np.asarray(ab["a"]) @ np.asarray(ab["b"])).T
        assert_close(m, want, 1e-6)
    assert_close(run(module, {"params": merged}, args), run(wrapped, variables, args), 1e-5)


def test_adam_trains_only_factors(gpt2):
    module, params, args, _ = gpt2
    _, wrapped, lora = adapt(module, params, args, TARGETS)
    variables = {"params": params, "lora": random_factors(lora)}
    labels = jnp.roll(args[0], -1, axis=1)

    @jax.jit
    def loss_and_grad(variables):
        def loss(v):
            logits = run(wrapped, v, args)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.value_and_grad(loss)(variables)

    tx = jax_lora.optimizer(optax.adam(1e-2))
    state = tx.init(variables)
    losses = []
    for _ in range(5):
        loss, grads = loss_and_grad(variables)
        losses.append(float(loss))
        with jax.numpy_dtype_promotion("standard"):  # optax's adam bias correction
            updates, state = tx.update(grads, state, variables)
        assert not any(jnp.any(u) for u in jax.tree.leaves(updates["params"]))
        assert all(bool(jnp.all(u != 0)) for u in jax.tree.leaves(updates["lora"]))
        variables = optax.apply_updates(variables, updates)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params)
    final, _ = loss_and_grad(variables)
    assert float(final) < losses[0] - 1e-3, (losses, float(final))


def test_peft_export_loads_in_peft(gpt2, tmp_path):
    module, params, args, torch_model = gpt2
    config, wrapped, lora = adapt(module, params, args, TARGETS)
    lora = random_factors(lora)
    directory = tmp_path / "adapter"
    names = jax_lora.export_peft(directory, lora, config, torch_name=torch_name)
    assert names == sorted(torch_name(p) for p in ADAPTED)
    # the default names drop the weight name too
    assert jax_lora.export_peft(tmp_path / "default", lora, config) == names
    model = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), str(directory))
    model.eval()
    for path, ab in factor_paths(lora).items():
        layer = model.get_submodule("base_model.model." + torch_name(path))
        np.testing.assert_array_equal(layer.lora_A["default"].weight.detach().numpy().T, ab["a"])
        np.testing.assert_array_equal(layer.lora_B["default"].weight.detach().numpy().T, ab["b"])
    with torch.no_grad():
        want = torch_logits(model, args).numpy()
    assert_close(run(wrapped, {"params": params, "lora": lora}, args), want, 1e-5)
    back, back_config = jax_lora.import_peft(directory, flax_path=flax_path, like=lora)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, lora))
    assert (back_config.rank, back_config.scale) == (RANK, config.scale)
