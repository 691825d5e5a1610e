"""DoRA parity rows on non-Dense layers (PEFT ``use_dora=True`` on ``Conv1d``, ``Conv2d`` and
``Embedding``): forward, A/B/magnitude gradients, 20 Adam steps, merge, and PEFT's file format
both ways (``lora_magnitude_vector``: ``(1, out, 1...)`` for a conv, ``(embedding_dim,)``)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn as tnn

import jax_lora

from .comparisons import (
    ALL,
    CNN_BATCH,
    CNN_HW,
    CNN_OUT,
    TRAIN_TOL,
    FlaxCNN,
    FlaxEmbed,
    Row,
    TorchCNN,
    TorchEmbed,
    _at,
    _conv_b_from_torch,
    _conv_b_to_torch,
    _conv_from_torch,
    _conv_to_torch,
    _emb_from_torch,
    _emb_to_torch,
    _embed_data,
    _embed_params,
    _export_import,
    _Factor,
    _flax_params_from,
    _np,
    _Twin,
    jax_adam,
    row,
)

RANK, ALPHA = 4, 8.0

# Conv1d(3, 6, 3, padding=1) -> relu -> Conv1d(6, 6, 3) -> flatten -> Linear


class FlaxConv1(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, L, 3), NLC
        h = nn.relu(nn.Conv(6, (3,), padding=((1, 1),), name="conv1")(x))
        h = nn.Conv(6, (3,), padding="VALID", name="conv2")(h)
        h = jnp.transpose(h, (0, 2, 1)).reshape(h.shape[0], -1)  # torch's (C, L) flatten
        return nn.Dense(CNN_OUT, name="head")(h)


class TorchConv1(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv1d(3, 6, 3, padding=1)
        self.conv2 = tnn.Conv1d(6, 6, 3)
        self.head = tnn.Linear(6 * (CNN_HW - 2), CNN_OUT)

    def forward(self, x):  # (B, 3, L), NCL
        return self.head(self.conv2(torch.relu(self.conv1(x))).flatten(1))


@dataclasses.dataclass
class _DoraTwin:
    """A `comparisons._Twin` plus each adapted weight's torch magnitude parameter."""

    twin: _Twin
    mags: list[torch.Tensor]  # PEFT's lora_magnitude_vector weights, in `twin.factors` order
    config: jax_lora.LoraConfig
    fresh_base: Callable[[], tnn.Module]
    init_m: list[np.ndarray]  # PEFT's magnitude at init (b = 0)

    def jax_m(self, lora) -> list[np.ndarray]:
        """Our magnitudes in PEFT's shapes."""
        return [
            np.asarray(_at(lora, f.path)["m"]).reshape(tuple(m.shape))
            for f, m in zip(self.twin.factors, self.mags, strict=True)
        ]


def _conv_twin(conv1d: bool, seed: int = 0) -> _DoraTwin:
    """PEFT ``LoraConfig(target_modules=["conv1", "conv2"], r=4, lora_alpha=8, use_dora=True)``
    on the CNN (Conv2d) or on `TorchConv1`; PEFT's initial ``lora_A`` is copied into ``a``, both
    ``b`` and both magnitudes get the same random values."""
    from peft import LoraConfig, get_peft_model

    torch_cls, flax_cls = (TorchConv1, FlaxConv1) if conv1d else (TorchCNN, FlaxCNN)
    n_spatial = 1 if conv1d else 2
    torch.manual_seed(seed)
    base = torch_cls()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh_base():
        m = torch_cls()
        m.load_state_dict(state)
        return m.eval()

    pm = get_peft_model(
        base,
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["conv1", "conv2"], use_dora=True),
    )
    g = np.random.default_rng(seed + 1)
    shape = (CNN_BATCH, CNN_HW, 3) if conv1d else (CNN_BATCH, CNN_HW, CNN_HW, 3)
    x = g.normal(size=shape).astype(np.float32)
    y = g.normal(size=(CNN_BATCH, CNN_OUT)).astype(np.float32)
    config = jax_lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=["conv1", "conv2"], use_dora=True)
    wrapped = jax_lora.wrap(flax_cls(), config)
    variables = flax_cls().init(jax.random.key(0), x)
    hw = _np(state["head.weight"])
    params = _flax_params_from(
        variables,
        {
            ("conv1", "kernel"): _conv_from_torch(state["conv1.weight"]),
            ("conv1", "bias"): _np(state["conv1.bias"]),
            ("conv2", "kernel"): _conv_from_torch(state["conv2.weight"]),
            ("conv2", "bias"): _np(state["conv2.bias"]),
            ("head", "kernel"): np.ascontiguousarray(hw.T),
            ("head", "bias"): _np(state["head.bias"]),
        },
    )
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, x)
    factors, mags, init_m = [], [], []
    for name in ("conv1", "conv2"):
        layer = pm.base_model.model.get_submodule(name)
        a_t, b_t = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        m_t = layer.lora_magnitude_vector["default"].weight
        init_m.append(_np(m_t).copy())
        m_new = (_np(m_t) * (1 + 0.3 * g.random(tuple(m_t.shape)))).astype(np.float32)
        with torch.no_grad():
            b_t.copy_(torch.from_numpy((0.3 * g.normal(size=tuple(b_t.shape))).astype(np.float32)))
            m_t.copy_(torch.from_numpy(m_new))
        lora[name]["kernel"] = {
            "a": jnp.asarray(_conv_from_torch(a_t)),
            "b": jnp.asarray(_conv_b_from_torch(b_t)),
            "m": jnp.asarray(m_new.reshape(-1)),
        }
        factors.append(
            _Factor(
                (name, "kernel"),
                a_t,
                b_t,
                _conv_to_torch,
                lambda b: _conv_b_to_torch(b, n_spatial),
            )
        )
        mags.append(m_t)
    perm = (0, 2, 1) if conv1d else (0, 3, 1, 2)  # channels-last -> channels-first
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(perm)))
    twin = _Twin(pm, wrapped, params, lora, factors, x, x_t, y)
    return _DoraTwin(twin, mags, config, fresh_base, init_m)


def _embed_twin(seed: int = 0) -> _DoraTwin:
    """PEFT ``LoraConfig(target_modules=["emb"], r=4, lora_alpha=8, use_dora=True)`` on
    Embedding(50, 16) -> Linear; PEFT's initial ``lora_embedding_B`` is copied into ``b``, both
    ``A`` (PEFT's are zeros) and both magnitudes get the same random values."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = TorchEmbed()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh_base():
        m = TorchEmbed()
        m.load_state_dict(state)
        return m.eval()

    g, ids, y = _embed_data(seed + 1, False)
    config = jax_lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=["emb"], use_dora=True)
    params = _embed_params(ids, state, False)
    wrapped = jax_lora.wrap(FlaxEmbed(), config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, ids)
    pm = get_peft_model(
        base, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["emb"], use_dora=True)
    )
    layer = pm.base_model.model.emb
    a_t, b_t = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    m_t = layer.lora_magnitude_vector["default"].weight
    init_m = [_np(m_t).copy()]
    a = (0.3 * g.normal(size=tuple(a_t.shape))).astype(np.float32)
    m_new = (_np(m_t) * (1 + 0.3 * g.random(tuple(m_t.shape)))).astype(np.float32)
    with torch.no_grad():
        a_t.copy_(torch.from_numpy(a))
        m_t.copy_(torch.from_numpy(m_new))
    lora["emb"]["embedding"] = {
        "a": jnp.asarray(_emb_from_torch(a)),
        "b": jnp.asarray(_emb_from_torch(b_t)),
        "m": jnp.asarray(m_new),
    }
    factors = [_Factor(("emb", "embedding"), a_t, b_t, _emb_to_torch, _emb_to_torch)]
    twin = _Twin(pm, wrapped, params, lora, factors, ids, torch.from_numpy(ids.astype(np.int64)), y)
    return _DoraTwin(twin, [m_t], config, fresh_base, init_m)


def _forward_grads(dt: _DoraTwin, label: str) -> list[Row]:
    twin = dt.twin
    twin.torch_model.eval()
    out_t = twin.torch_model(twin.x_torch)
    torch.mean((out_t - torch.from_numpy(twin.y)) ** 2).backward()
    g = jax.grad(twin.jax_loss)(twin.lora)
    ga, gb = twin.to_torch(g)
    fresh = jax_lora.init_lora(twin.wrapped, jax.random.key(3), {"params": twin.params}, twin.x_jax)
    return [
        row(f"{label}: magnitude init ‖W‖", dt.jax_m(fresh), dt.init_m),
        row(f"{label}: forward", twin.jax_out(), out_t),
        row(f"{label}: grad A", ga, [f.a_t.grad for f in twin.factors]),
        row(f"{label}: grad B", gb, [f.b_t.grad for f in twin.factors]),
        row(f"{label}: grad magnitude", dt.jax_m(g), [m.grad for m in dt.mags]),
    ]


def _adam(dt: _DoraTwin, label: str, steps: int = 20, lr: float = 1e-2) -> list[Row]:
    twin = dt.twin
    twin.torch_model.eval()
    params = [p for f in twin.factors for p in (f.a_t, f.b_t)] + list(dt.mags)
    topt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    losses_t = []
    for _ in range(steps):
        topt.zero_grad()
        loss = twin.torch_loss()
        loss.backward()
        topt.step()
        losses_t.append(loss.item())
    tree, losses_j = jax_adam(twin.jax_loss, twin.params, twin.lora, steps, lr)
    ratio = losses_j[-1] / losses_j[0]
    a, b = twin.to_torch(tree["lora"])
    return [
        Row(
            f"{label}: Adam reduces the loss (final/initial)",
            ratio,
            ratio,
            0.9,
            "final/initial <= tol",
            ratio <= 0.9,
        ),
        row(
            f"{label}: loss over {steps} Adam steps",
            np.array(losses_j),
            np.array(losses_t),
            TRAIN_TOL,
        ),
        row(
            f"{label}: A, B, magnitude after {steps} Adam steps",
            a + b + dt.jax_m(tree["lora"]),
            [f.a_t for f in twin.factors] + [f.b_t for f in twin.factors] + list(dt.mags),
            TRAIN_TOL,
        ),
    ]


def _merge(dt: _DoraTwin, label: str, to_torch: Callable[[np.ndarray], np.ndarray]) -> list[Row]:
    """PEFT's ``merge_and_unload`` weights vs `jax_lora.merge`, and the merged outputs."""
    twin = dt.twin
    merged_t = copy.deepcopy(twin.torch_model).merge_and_unload().eval()
    merged_j = jax_lora.merge({"params": twin.params, "lora": twin.lora}, twin.wrapped, twin.x_jax)
    names = [f.path for f in twin.factors]
    with torch.no_grad():
        out_t = merged_t(twin.x_torch)
    return [
        row(
            f"{label}: merged weights",
            [to_torch(_at(merged_j, p)) for p in names],
            [merged_t.get_submodule(p[0]).weight for p in names],
        ),
        row(
            f"{label}: merged forward",
            type(twin.wrapped.base)().apply({"params": merged_j}, twin.x_jax),
            out_t,
        ),
    ]


def _rows(make: Callable[[], _DoraTwin], label: str, to_torch) -> list[Row]:
    rows = _forward_grads(make(), label)
    rows += _adam(make(), label)
    rows += _merge(make(), label, to_torch)
    dt = make()
    return rows + _export_import(dt.twin, dt.config, dt.fresh_base, label)


def dora_conv2d() -> list[Row]:
    """DoRA vs PEFT's ``Conv2d`` DoRA (`DoraConv2dLayer`) on the small CNN, both convs."""
    return _rows(lambda: _conv_twin(False), "DoRA PEFT Conv2d CNN", _conv_to_torch)


def dora_conv1d() -> list[Row]:
    """DoRA vs PEFT's ``Conv1d`` DoRA (`DoraConv1dLayer`), both convs."""
    return _rows(lambda: _conv_twin(True), "DoRA PEFT Conv1d", _conv_to_torch)


def dora_embed() -> list[Row]:
    """DoRA vs PEFT's ``Embedding`` DoRA (`DoraEmbeddingLayer`: ``(m/n)·(E[ids] + lora)``, the
    norm per embedding dim over the vocabulary) on Embedding(50, 16) -> Linear."""
    return _rows(_embed_twin, "DoRA PEFT Embedding -> Linear", np.asarray)


ALL["dora_conv2d"] = dora_conv2d
ALL["dora_conv1d"] = dora_conv1d
ALL["dora_embed"] = dora_embed


# GPT-2's Conv1D: transformers' FlaxConv1D stores its kernel (out, in) (a layer's own weight,
# `jax_lora.weights`); PEFT adapts torch's Conv1D (in, out) as a Linear with fan_in_fan_out.

GPT2_LAYERS, GPT2_D, GPT2_VOCAB, GPT2_T = 2, 32, 64, 8


def _gpt2_torch_state(params) -> dict:
    """Flax GPT-2 params -> torch ``GPT2LMHeadModel`` state dict (FlaxConv1D kernel (out, in)
    is torch Conv1D weight (in, out); the head is tied to ``wte``)."""
    rename = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    state = {}
    for path, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        *module, leaf = [str(k.key) for k in path]
        v = np.asarray(v)
        state[".".join([*module, rename[leaf]])] = v.T if leaf == "kernel" else v
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return {k: torch.from_numpy(np.array(v)) for k, v in state.items()}


def dora_gpt2_conv1d() -> list[Row]:
    """DoRA on a tiny random GPT-2's c_attn, c_proj, c_fc (FlaxConv1D, a layer's own weight) vs
    PEFT ``LoraConfig(use_dora=True, fan_in_fan_out=True)`` on torch's GPT-2 with the same
    weights: forward, A/B/magnitude gradients, merged weights, PEFT's format both ways."""
    import tempfile

    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    hf = lambda: jax.numpy_dtype_promotion("standard")  # noqa: E731  (transformers' Flax code)
    cfg = transformers.GPT2Config(
        n_layer=GPT2_LAYERS, n_embd=GPT2_D, n_head=4, vocab_size=GPT2_VOCAB, n_positions=32
    )
    with hf(), jax.numpy_rank_promotion("allow"):
        fm = transformers.FlaxGPT2LMHeadModel(cfg, seed=0, dtype=jnp.float32)
    params = jax.tree.map(jnp.asarray, fm.params)
    torch.manual_seed(0)
    base_t = transformers.GPT2LMHeadModel(cfg)
    base_t.load_state_dict(_gpt2_torch_state(params), strict=True)
    base_t.eval()
    ids = np.random.default_rng(0).integers(0, GPT2_VOCAB, (2, GPT2_T)).astype(np.int32)
    args = (
        jnp.asarray(ids),
        jnp.ones((2, GPT2_T), jnp.int32),
        jnp.broadcast_to(jnp.arange(GPT2_T, dtype=jnp.int32), (2, GPT2_T)),
    )
    targets = [r".*/c_attn", r".*/c_proj", r".*/c_fc"]
    config = jax_lora.LoraConfig(rank=RANK, alpha=ALPHA, targets=targets, use_dora=True)
    wrapped = jax_lora.wrap(fm.module, config)

    def run(module, variables):
        with hf(), jax.numpy_rank_promotion("allow"):
            return module.apply(variables, *args, deterministic=True).logits

    with hf(), jax.numpy_rank_promotion("allow"):
        fresh = jax_lora.init_lora(
            wrapped, jax.random.key(0), {"params": params}, *args, deterministic=True
        )
    g = np.random.default_rng(1)
    nodes = {
        "/".join(str(k.key) for k in path[:-1]): None
        for path, _ in jax.tree_util.tree_flatten_with_path(fresh)[0]
    }
    lora = jax.tree.map(lambda t: t, fresh)
    for p in nodes:
        node = _at(lora, tuple(p.split("/")))
        node["a"] = jnp.asarray(0.2 * g.normal(size=node["a"].shape), jnp.float32)
        node["b"] = jnp.asarray(0.2 * g.normal(size=node["b"].shape), jnp.float32)
        node["m"] = node["m"] * jnp.asarray(1 + 0.3 * g.random(node["m"].shape), jnp.float32)
    pcfg = LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        use_dora=True,
    )
    pm = get_peft_model(copy.deepcopy(base_t), pcfg).eval()
    layers = {
        p: pm.get_submodule("base_model.model." + p.removesuffix("/kernel").replace("/", "."))
        for p in nodes
    }
    init_m = [_np(layers[p].lora_magnitude_vector["default"].weight).copy() for p in nodes]
    with torch.no_grad():
        for p, layer in layers.items():
            node = _at(lora, tuple(p.split("/")))
            layer.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(node["a"]).T.copy()))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(node["b"]).T.copy()))
            layer.lora_magnitude_vector["default"].weight.copy_(
                torch.from_numpy(np.array(node["m"]))
            )
    probe = np.random.default_rng(2).normal(size=(2, GPT2_T, GPT2_VOCAB)).astype(np.float32)
    ids_t, mask_t, pos_t = (torch.from_numpy(np.asarray(x, np.int64)) for x in args)

    def torch_out(model):
        return model(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t).logits

    out_t = torch_out(pm)
    (out_t * torch.from_numpy(probe)).sum().backward()
    out_j = run(wrapped, {"params": params, "lora": lora})
    grads = jax.grad(lambda lo: jnp.sum(run(wrapped, {"params": params, "lora": lo}) * probe))(lora)
    ps = list(nodes)
    label = "DoRA GPT-2 Conv1D vs PEFT fan_in_fan_out"
    rows = [
        row(f"{label}: magnitude init", [_at(fresh, tuple(p.split("/")))["m"] for p in ps], init_m),
        row(f"{label}: forward", out_j, out_t),
        row(
            f"{label}: grad A, B, magnitude",
            [_at(grads, tuple(p.split("/")))[k].T for p in ps for k in ("a", "b")]
            + [_at(grads, tuple(p.split("/")))["m"] for p in ps],
            [
                t
                for p in ps
                for t in (
                    layers[p].lora_A["default"].weight.grad,
                    layers[p].lora_B["default"].weight.grad,
                )
            ]
            + [layers[p].lora_magnitude_vector["default"].weight.grad for p in ps],
        ),
    ]
    with hf(), jax.numpy_rank_promotion("allow"):
        merged = jax_lora.merge(
            {"params": params, "lora": lora}, wrapped, *args, deterministic=True
        )
    merged_t = copy.deepcopy(pm).merge_and_unload().eval()
    rows.append(
        row(
            f"{label}: merged weights (torch Conv1D (in, out))",
            [np.asarray(_at(merged, tuple(p.split("/")))).T for p in ps],
            [
                merged_t.get_submodule(p.removesuffix("/kernel").replace("/", ".")).weight
                for p in ps
            ],
        )
    )
    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft(tmp, lora, config, fan_in_fan_out=True)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base_t), tmp).eval()
        with torch.no_grad():
            rows.append(
                row(f"{label}: export_peft -> PeftModel.from_pretrained", out_j, torch_out(loaded))
            )
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        back, _ = jax_lora.import_peft(tmp, like=lora)
    rows.append(
        row(
            f"{label}: save_pretrained -> import_peft, forward",
            run(wrapped, {"params": params, "lora": back}),
            out_t,
        )
    )
    return rows


ALL["dora_gpt2_conv1d"] = dora_gpt2_conv1d
