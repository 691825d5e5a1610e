"""DoRA parity rows (PEFT ``use_dora=True``): a small MLP (forward, gradients, 20 Adam steps, the
dropout case, merge) and the real MiniLM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn as tnn

import jax_lora
from jax_lora import factors

from . import convert
from .comparisons import (
    ALL,
    LINEARS,
    TRAIN_TOL,
    FlaxMLP,
    Row,
    TorchMLP,
    _data,
    _flax_params,
    _lora_tree,
    _mse_jax,
    _random_factors,
    jax_adam,
    row,
)

RANK, ALPHA = 4, 8.0


def _magnitudes(shapes: dict[str, tuple[int, int]], seed: int = 2) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    return {n: (1.0 + 0.5 * g.random(o)).astype(np.float32) for n, (_, o) in shapes.items()}


class _DoraPair:
    """The MLP with DoRA on every Linear in PEFT and in jax_lora, the same weights."""

    def __init__(self, dropout: float = 0.0, seed: int = 0):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        self.config = jax_lora.LoraConfig(
            rank=RANK, alpha=ALPHA, targets=list(LINEARS), dropout=dropout, use_dora=True
        )
        base = TorchMLP()
        shapes = {n: (getattr(base, n).in_features, getattr(base, n).out_features) for n in LINEARS}
        cfg = LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=list(LINEARS), lora_dropout=dropout
        )
        cfg.use_dora = True
        self.torch = get_peft_model(base, cfg)
        self.init_m = {
            n: self.layer(n).lora_magnitude_vector["default"].weight.detach().clone()
            for n in LINEARS
        }
        fs, ms = _random_factors(shapes, RANK), _magnitudes(shapes)
        for n in LINEARS:
            layer = self.layer(n)
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(torch.from_numpy(fs[n][0]))
                layer.lora_B["default"].weight.copy_(torch.from_numpy(fs[n][1]))
                layer.lora_magnitude_vector["default"].weight.copy_(torch.from_numpy(ms[n]))
        self.wrapped = jax_lora.wrap(FlaxMLP(), self.config)
        self.params = _flax_params(self.torch.base_model.model)
        self.lora = _lora_tree(fs)
        for n in LINEARS:
            self.lora[n]["m"] = jnp.asarray(ms[n])

    def layer(self, n: str):
        return self.torch.base_model.model.get_submodule(n)

    def torch_params(self) -> list[tuple[str, tnn.Parameter, tnn.Parameter, tnn.Parameter]]:
        return [
            (
                n,
                self.layer(n).lora_A["default"].weight,
                self.layer(n).lora_B["default"].weight,
                self.layer(n).lora_magnitude_vector["default"].weight,
            )
            for n in LINEARS
        ]

    def jax_loss(self, lora, x, y, **kw):
        return _mse_jax(self.wrapped.apply({"params": self.params, "lora": lora}, x, **kw), y)


def _factor_rows(label: str, lora, tp, grads: bool, tol: float) -> list[Row]:
    g = (lambda p: p.grad) if grads else (lambda p: p)
    return [
        row(
            f"{label} A",
            [convert.a_to_peft(lora[n]["a"]) for n, *_ in tp],
            [g(a) for _, a, _, _ in tp],
            tol,
        ),
        row(
            f"{label} B",
            [convert.b_to_peft(lora[n]["b"]) for n, *_ in tp],
            [g(b) for _, _, b, _ in tp],
            tol,
        ),
        row(f"{label} magnitude", [lora[n]["m"] for n, *_ in tp], [g(m) for *_, m in tp], tol),
    ]


def dora_mlp() -> list[Row]:
    pair = _DoraPair()
    # the magnitude PEFT makes at init (b = 0: ‖W‖ per output) vs ours on the same base
    ours = jax_lora.init_lora(
        pair.wrapped, jax.random.key(3), {"params": pair.params}, jnp.zeros((1, 16))
    )
    rows = [
        row(
            "dora mlp: magnitude init",
            [ours[n]["m"] for n in LINEARS],
            [pair.init_m[n] for n in LINEARS],
        )
    ]
    x, y = _data()
    pair.torch.eval()
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = pair.torch(xt)
    torch.mean((out_t - torch.from_numpy(y)) ** 2).backward()
    out_j = pair.wrapped.apply({"params": pair.params, "lora": pair.lora}, x)
    g_lora, g_x = jax.grad(lambda lo, x: pair.jax_loss(lo, x, y), argnums=(0, 1))(
        pair.lora, jnp.asarray(x)
    )
    tp = pair.torch_params()
    rows.append(row("dora mlp: forward", out_j, out_t))
    rows += _factor_rows("dora mlp: grad", g_lora, tp, True, 1e-5)
    rows.append(row("dora mlp: grad input", g_x, xt.grad))
    rows += _merge_rows(pair)
    rows += _adam(pair, "dora mlp")
    return rows


def _adam(pair: _DoraPair, label: str, steps: int = 20, lr: float = 1e-2) -> list[Row]:
    x, y = _data(3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tp = pair.torch_params()
    topt = torch.optim.Adam([p for _, *ps in tp for p in ps], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    losses_t = []
    for _ in range(steps):
        topt.zero_grad()
        loss = torch.mean((pair.torch(xt) - yt) ** 2)
        loss.backward()
        topt.step()
        losses_t.append(loss.item())
    loss_of = lambda lora: pair.jax_loss(lora, x, y)  # noqa: E731
    tree, losses_j = jax_adam(loss_of, pair.params, pair.lora, steps, lr)
    ratio = losses_j[-1] / losses_j[0]
    return [
        Row(
            f"{label}: Adam reduces the loss",
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
        *_factor_rows(f"{label}: after {steps} Adam steps,", tree["lora"], tp, False, TRAIN_TOL),
    ]


def _merge_rows(pair: _DoraPair) -> list[Row]:
    """PEFT's merged weights (``merge_and_unload``) vs `jax_lora.merge`, and the merged outputs."""
    import copy

    x, _ = _data()
    merged_t = copy.deepcopy(pair.torch).merge_and_unload()
    merged_j = jax_lora.merge({"params": pair.params, "lora": pair.lora}, pair.config)
    want = [
        convert.kernel_from_torch(
            merged_t.get_submodule(n).weight.detach().numpy(),
            (merged_t.get_submodule(n).in_features,),
            (merged_t.get_submodule(n).out_features,),
        )
        for n in LINEARS
    ]
    return [
        row("dora mlp: merged kernels", [merged_j[n]["kernel"] for n in LINEARS], want),
        row(
            "dora mlp: merged forward",
            FlaxMLP().apply({"params": merged_j}, x),
            merged_t(torch.from_numpy(x)),
        ),
    ]


class _MaskDropout(tnn.Module):
    def __init__(self, mask: np.ndarray, p: float):
        super().__init__()
        self.mask, self.p = torch.from_numpy(mask), p

    def forward(self, x):
        return x * self.mask / (1 - self.p) if self.training else x


def dora_dropout_train() -> list[Row]:
    """Training with LoRA dropout: PEFT scales the *dropped-out* ``x @ W`` by ``m/n - 1``."""
    p = 0.3
    pair = _DoraPair(dropout=p)
    x, y = _data(5)
    masks = {}
    g = np.random.default_rng(9)
    for n in LINEARS:
        layer = pair.layer(n)
        masks[n] = (g.random((x.shape[0], layer.in_features)) > p).astype(np.float32)
        layer.lora_dropout["default"] = _MaskDropout(masks[n], p)
    pair.torch.train()
    xt = torch.from_numpy(x)
    out_t = pair.torch(xt)
    torch.mean((out_t - torch.from_numpy(y)) ** 2).backward()
    # one layer at a time in jax: each layer's mask is its own; run layer by layer via the
    # layer-level mask lookup keyed by input width (fc1: 16, fc2/head: 32 -> differ by layer)
    order = iter([masks[n] for n in LINEARS])
    orig = factors.dropout

    def drop(x, rate, key):
        return x * jnp.asarray(next(order)) / jnp.asarray(1 - rate, x.dtype)

    factors.dropout = drop
    try:
        out_j = pair.wrapped.apply(
            {"params": pair.params, "lora": pair.lora}, x, rngs={"dropout": jax.random.key(0)}
        )
        order = iter([masks[n] for n in LINEARS])
        grads = jax.grad(lambda lo: pair.jax_loss(lo, x, y, rngs={"dropout": jax.random.key(0)}))(
            pair.lora
        )
    finally:
        factors.dropout = orig
    return [
        row("dora mlp, dropout training: forward", out_j, out_t),
        *_factor_rows("dora mlp, dropout training: grad", grads, pair.torch_params(), True, 1e-5),
    ]


ALL["dora_mlp"] = dora_mlp
ALL["dora_dropout_train"] = dora_dropout_train


def dora_minilm() -> list[Row]:
    """The real all-MiniLM-L6-v2 with DoRA on q, k, v and the attention output (rank 4): PEFT's
    model saved (``save_pretrained``) -> `import_peft` -> forward and gradients vs PEFT; our
    adapter -> `export_peft` -> ``PeftModel.from_pretrained`` -> outputs; merged weights."""
    import copy
    import tempfile

    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    from .comparisons import _minilm, _np

    bert, d, cfg, ids, mask = _minilm()
    params = bert.load_params(d, cfg)
    keep = mask.astype(bool)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    targets = r".*/attention/self/(query|key|value)|.*/attention/output/dense"
    config = jax_lora.LoraConfig(rank=4, alpha=8.0, targets=targets, use_dora=True)
    wrapped = jax_lora.wrap(bert.Bert(cfg), config)

    def hf():
        return transformers.BertModel.from_pretrained(
            d, add_pooling_layer=False, attn_implementation="eager"
        ).eval()

    pcfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["query", "key", "value", "attention.output.dense"]
    )
    pcfg.use_dora = True
    torch.manual_seed(0)
    pm = get_peft_model(hf(), pcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    pm.eval()
    out_t = pm(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
    (out_t * torch.from_numpy(keep[..., None].astype(np.float32))).square().sum().backward()
    like = jax.eval_shape(
        lambda: jax_lora.init_lora(wrapped, jax.random.key(0), {"params": params}, ids, mask)
    )
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        lora, config2 = jax_lora.import_peft(tmp, flax_path=bert.flax_path, like=like)
    assert config2.use_dora

    def loss(lora):
        out = jax_lora.wrap(bert.Bert(cfg), config2).apply(
            {"params": params, "lora": lora}, ids, mask
        )
        return jnp.sum((out * keep[..., None].astype(out.dtype)) ** 2)

    out_j = jax_lora.wrap(bert.Bert(cfg), config2).apply(
        {"params": params, "lora": lora}, ids, mask
    )
    base = bert.Bert(cfg).apply({"params": params}, ids, mask)
    assert np.abs(np.asarray(out_j - base))[keep].max() > 1e-2, "DoRA update is a no-op"
    grads = jax.grad(loss)(lora)
    label = "MiniLM-L6 + DoRA q,k,v,o r=4"
    tl = [
        (pm.base_model.model.get_submodule(bert.torch_name(p)), p.split("/"))
        for p in ("encoder/layer_0/attention/self/query", "encoder/layer_5/attention/output/dense")
    ]

    def at(tree, parts):
        for k in parts:
            tree = tree[k]
        return tree

    rows = [
        row(f"{label}: import_peft(PEFT save) forward", np.asarray(out_j)[keep], _np(out_t)[keep]),
        row(
            f"{label}: grad A, B, magnitude (layer 0 q, layer 5 o)",
            [
                t
                for _, parts in tl
                for t in (
                    convert.a_to_peft(at(grads, parts)["a"]),
                    convert.b_to_peft(at(grads, parts)["b"]),
                    at(grads, parts)["m"],
                )
            ],
            [
                t
                for m, _ in tl
                for t in (
                    m.lora_A["default"].weight.grad,
                    m.lora_B["default"].weight.grad,
                    m.lora_magnitude_vector["default"].weight.grad,
                )
            ],
        ),
    ]
    # ours -> PEFT: perturb the imported adapter so the export is not a copy of PEFT's file
    lora_x = jax.tree.map(lambda t: t * 1.1, lora)
    out_x = wrapped.apply({"params": params, "lora": lora_x}, ids, mask)
    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft(tmp, lora_x, config, torch_name=bert.torch_name)
        px = PeftModel.from_pretrained(hf(), tmp).eval()
        with torch.no_grad():
            out_px = px(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
    rows.append(
        row(
            f"{label}: export_peft -> PeftModel.from_pretrained",
            np.asarray(out_x)[keep],
            _np(out_px)[keep],
        )
    )
    merged_t = copy.deepcopy(pm).merge_and_unload()
    merged_j = jax_lora.merge({"params": params, "lora": lora}, config)
    with torch.no_grad():
        out_mt = merged_t(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
    out_mj = bert.Bert(cfg).apply({"params": merged_j}, ids, mask)
    rows.append(row(f"{label}: merged model forward", np.asarray(out_mj)[keep], _np(out_mt)[keep]))
    return rows


ALL["dora_minilm"] = dora_minilm
