"""Training-step memory of the Llama: the chunked cross-entropy (`jax_lora.lm.loss`) and
rematerialisation give the same losses and gradients as the plain step, and the compiled
step's temporaries (``memory_analysis()``) really fall."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jax_lora
from jax_lora.lm import llama, loss

CFG = llama.LlamaConfig(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
TARGETS = r".*/(q|k|v|o|gate|up|down)_proj"


def assert_close(a, b, tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        scale = max(np.abs(y).max(), 1e-30)
        assert np.abs(x - y).max() <= tol * scale, (np.abs(x - y).max(), scale)


@pytest.mark.parametrize("transposed", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_cross_entropy_equals_optax_with_grads(transposed, chunk):
    kh, kw, ky = jax.random.split(jax.random.key(0), 3)
    h = jax.random.normal(kh, (2, 7, 16))
    w = jax.random.normal(kw, (50, 16) if transposed else (16, 50))
    y = jax.random.randint(ky, (2, 7), 0, 50)

    def plain(h, w):
        logits = h @ (w.T if transposed else w)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def chunked(h, w):
        return loss.chunked_cross_entropy(h, w, y, transposed=transposed, chunk=chunk)

    assert chunked(h, w).shape == (2, 7)
    assert_close(chunked(h, w), plain(h, w), 1e-6)
    # a weighted sum, so each token's gradient differs
    m = jnp.arange(14.0).reshape(2, 7)
    g1 = jax.grad(lambda h, w: (chunked(h, w) * m).sum(), argnums=(0, 1))(h, w)
    g2 = jax.grad(lambda h, w: (plain(h, w) * m).sum(), argnums=(0, 1))(h, w)
    assert_close(g1, g2, 1e-5)


def test_chunked_cross_entropy_bad_shapes():
    h, y = jnp.ones((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"head weight \(4, 10\) is not \(vocab, d\)"):
        loss.chunked_cross_entropy(h, jnp.ones((4, 10)), y)
    with pytest.raises(ValueError, match=r"labels \(3, 2\)"):
        loss.chunked_cross_entropy(h, jnp.ones((10, 4)), y.T)


def _setup(tied=True, remat=False):
    import dataclasses

    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    model = llama.Llama(cfg, remat=remat)
    ids = jax.random.randint(jax.random.key(1), (2, 13), 0, cfg.vocab_size)
    params = model.init(jax.random.key(0), ids[:, :-1])["params"]
    wrapped = jax_lora.wrap(model, jax_lora.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    lora = jax_lora.init_lora(wrapped, jax.random.key(2), {"params": params}, ids[:, :-1])
    # non-zero B so every factor gets a gradient that depends on the others
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), lora)
    return model, wrapped, params, lora, ids


@pytest.mark.parametrize("tied", [True, False])
def test_llama_chunked_loss_and_lora_grads_equal_plain(tied):
    _, wrapped, params, lora, ids = _setup(tied)

    def mean_nll(lora, chunk):
        nll = loss.llama_token_nll(
            wrapped.apply, {"params": params, "lora": lora}, ids[:, :-1], ids[:, 1:], chunk=chunk
        )
        return nll.mean()

    value_and_grad = jax.jit(jax.value_and_grad(mean_nll), static_argnums=1)
    l1, g1 = value_and_grad(lora, 5)
    l2, g2 = value_and_grad(lora, None)
    assert_close(l1, l2, 1e-6)
    assert_close(g1, g2, 1e-5)  # tolerance: fp32 sums in another order


@pytest.mark.parametrize("tied", [True, False])
def test_llama_chunked_loss_full_fine_tune_grads_equal_plain(tied):
    """Full fine-tuning: the (tied) embedding's gradient has both parts, the lookup's and the
    head's, and equals the plain step's."""
    model, _, params, _, ids = _setup(tied)

    def mean_nll(params, chunk):
        nll = loss.llama_token_nll(
            model.apply, {"params": params}, ids[:, :-1], ids[:, 1:], chunk=chunk
        )
        return nll.mean()

    grad = jax.jit(jax.grad(mean_nll), static_argnums=1)
    g1, g2 = grad(params, 5), grad(params, None)
    assert_close(g1, g2, 1e-5)
    emb = g1["model"]["embed_tokens"]["embedding"]
    assert np.abs(np.asarray(emb)).max() > 0


def test_hidden_is_the_input_of_the_head():
    model, _, params, _, ids = _setup()
    h = model.apply({"params": params}, ids, hidden=True)
    assert h.shape == (2, 13, CFG.hidden_size)
    logits = model.apply({"params": params}, ids)
    assert_close(h @ params["model"]["embed_tokens"]["embedding"].T, logits, 1e-6)


def test_remat_same_loss_and_grads():
    _, wrapped, params, lora, ids = _setup(remat=False)
    _, rwrapped, _, _, _ = _setup(remat=True)

    def mean_nll(w):
        return lambda lo: loss.llama_token_nll(
            w.apply, {"params": params, "lora": lo}, ids[:, :-1], ids[:, 1:]
        ).mean()

    l1, g1 = jax.jit(jax.value_and_grad(mean_nll(rwrapped)))(lora)
    l2, g2 = jax.jit(jax.value_and_grad(mean_nll(wrapped)))(lora)
    assert_close(l1, l2, 1e-6)
    assert_close(g1, g2, 1e-5)


def test_scan_layers_same_loss_and_grads_and_layout_round_trip():
    _, wrapped, params, lora, ids = _setup()
    model = llama.Llama(CFG, remat=True, scan_layers=True)
    swrapped = jax_lora.wrap(model, jax_lora.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    sparams, slora = llama.stack_layers(params), llama.stack_layers(lora)
    # the stacked layout is the one the scanned model makes itself
    want = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
    assert jax.tree.map(jnp.shape, sparams) == jax.tree.map(jnp.shape, want)
    assert sparams["model"]["layers"]["mlp"]["up_proj"]["kernel"].shape == (2, 32, 64)
    assert_close(llama.unstack_layers(sparams), params, 0.0)

    def mean_nll(w, p):
        return lambda lo: loss.llama_token_nll(
            w.apply, {"params": p, "lora": lo}, ids[:, :-1], ids[:, 1:]
        ).mean()

    l1, g1 = jax.jit(jax.value_and_grad(mean_nll(swrapped, sparams)))(slora)
    l2, g2 = jax.jit(jax.value_and_grad(mean_nll(wrapped, params)))(lora)
    assert_close(l1, l2, 1e-6)
    assert_close(llama.unstack_layers(g1), g2, 1e-5)
    with pytest.raises(ValueError, match="no KV cache"):
        model.apply({"params": sparams}, ids[:, :1], cache_index=0, cache_len=4)
    with pytest.raises(ValueError, match="expected model/layers_0"):
        llama.stack_layers({"model": {"layers_1": {}}})


# --- the compiled step's temporaries ----------------------------------------------------------

MEM_CFG = llama.LlamaConfig(
    vocab_size=8192,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _temp_mib(*, remat, chunk, options=None, scan=False, cfg=MEM_CFG, batch=2, seq=256):
    """The compiled LoRA step's temporaries (MiB), compiled from shapes only."""
    model = llama.Llama(cfg, remat=remat, scan_layers=scan)
    wrapped = jax_lora.wrap(model, jax_lora.LoraConfig(rank=4, alpha=8, targets=TARGETS))
    x = jnp.zeros((1, 8), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), x))["params"]
    lora = jax.eval_shape(
        lambda p: jax_lora.init_lora(wrapped, jax.random.key(0), {"params": p}, x), params
    )

    def step(lora, params, ids):
        def f(lo):
            v = {"params": params, "lora": lo}
            return loss.llama_token_nll(wrapped.apply, v, ids[:, :-1], ids[:, 1:], chunk=chunk)

        return jax.grad(lambda lo: f(lo).mean())(lora)

    ids = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
    compiled = jax.jit(step, compiler_options=options).lower(lora, params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_chunked_loss_cuts_the_logits_memory():
    # logits: 2 x 256 x 8192 fp32 = 16 MiB a copy; the plain step keeps two or more
    # (measured: 38 MiB of temporaries plain, 11 MiB chunked)
    options = loss.cpu_remat_compiler_options
    plain = _temp_mib(remat=True, chunk=None, options=options)
    chunked = _temp_mib(remat=True, chunk=64, options=options)
    assert plain > 32
    assert chunked < 0.5 * plain, (chunked, plain)


def test_remat_cuts_the_activation_memory_with_cpu_options():
    if jax.default_backend() != "cpu":
        pytest.skip("the scheduler option is XLA:CPU's")
    options = loss.cpu_remat_compiler_options
    keep = _temp_mib(remat=False, chunk=64, options=options)
    remat = _temp_mib(remat=True, chunk=64, options=options)
    # 6 layers' activations kept vs one layer's recomputed at a time (measured: 56 MiB kept,
    # 11 MiB with remat; 53 MiB with remat but without the options: the bug this catches)
    assert remat < 0.5 * keep, (remat, keep)


def test_scanned_remat_cuts_the_activation_memory_without_options():
    keep = _temp_mib(remat=False, chunk=64, scan=True)
    remat = _temp_mib(remat=True, chunk=64, scan=True)
    assert remat < 0.5 * keep, (remat, keep)


@pytest.mark.parametrize("qtype", ["q4_1", "q8_0"])
def test_quantized_load_from_gguf_blocks_equals_quantizing_the_dequantized_file(tmp_path, qtype):
    """``load(gguf, "nf4")`` re-quantizes the file's own blocks one tensor at a time (no fp32
    copy of the model); the result is bit-identical to quantizing the fp32-decoded file."""
    import _lm

    from jax_lora.lm import models
    from jax_lora.quant import QArray

    path = _lm.write_gguf(str(tmp_path / "m.gguf"), qtype=qtype)
    want = models.quantize_base(models.load(path).params, "nf4")
    got = models.load(path, "nf4").params
    is_q = lambda x: isinstance(x, QArray)  # noqa: E731
    assert jax.tree.structure(got, is_leaf=is_q) == jax.tree.structure(want, is_leaf=is_q)
    kernel = got["model"]["layers_0"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(kernel, QArray) and kernel.qtype == "nf4"
    emb = got["model"]["embed_tokens"]["embedding"]
    assert not isinstance(emb, QArray) and emb.dtype == jnp.float32
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
