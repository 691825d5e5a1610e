"""Parity rows for PEFT's LoRA variants: ``rank_pattern`` / ``alpha_pattern``, LoRA+, PiSSA and
OLoRA initialisation and their conversion to plain LoRA (registered into ``comparisons.ALL``)."""

from __future__ import annotations

import copy
import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

import jax_lora

from . import convert
from .comparisons import (
    ALL,
    D_HID,
    D_IN,
    D_OUT,
    LINEARS,
    TRAIN_TOL,
    FlaxMLP,
    Row,
    TorchMLP,
    _data,
    _flax_params,
    _Pair,
    row,
)

# fc1 keeps r=4 / alpha 8; fc2 gets rank 2; head rank 6 and alpha 3 (PEFT's keys: module names)
PEFT_RANK_PATTERN, PEFT_ALPHA_PATTERN = {"fc2": 2, "head": 6}, {"head": 3.0}


def peft_rank_alpha_pattern() -> list[Row]:
    """Mixed ranks and alphas through PEFT's format, both ways, on the small MLP: PEFT's
    ``get_peft_model(rank_pattern=..., alpha_pattern=...)`` -> ``save_pretrained`` ->
    ``import_peft``, and our factors -> ``export_peft`` -> ``PeftModel.from_pretrained``."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    base = TorchMLP()
    state = copy.deepcopy(base.state_dict())
    pm = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=list(LINEARS),
            rank_pattern=PEFT_RANK_PATTERN,
            alpha_pattern=PEFT_ALPHA_PATTERN,
        ),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    x, _ = _data()
    with torch.no_grad():
        out_t = pm.eval()(torch.from_numpy(x))
    params = _flax_params(pm.base_model.model)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        lora, config = jax_lora.import_peft(tmp)
    ranks = {n: lora[n]["a"].shape[-1] for n in LINEARS}
    assert ranks == {"fc1": 4, "fc2": 2, "head": 6}, ranks
    out_j = jax_lora.wrap(FlaxMLP(), config).apply({"params": params, "lora": lora}, x)
    rows = [row("rank/alpha_pattern: PEFT save_pretrained -> import_peft, forward", out_j, out_t)]

    # ours -> PEFT: other factors, other patterns (our keys are Flax paths, PEFT's module names)
    ours = jax_lora.LoraConfig(
        rank=3, alpha=5.0, targets=list(LINEARS), rank_pattern={"fc1": 5}, alpha_pattern={"fc2": 1}
    )
    wrapped = jax_lora.wrap(FlaxMLP(), ours)
    init = wrapped.init(jax.random.key(0), jnp.asarray(x))["lora"]
    keys = iter(jax.random.split(jax.random.key(1), 6))
    lora = jax.tree.map(lambda t: 0.2 * jax.random.normal(next(keys), t.shape), init)
    out_j = wrapped.apply({"params": params, "lora": lora}, x)
    fresh = TorchMLP()
    fresh.load_state_dict(state)
    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft(tmp, lora, ours)
        pm2 = PeftModel.from_pretrained(fresh, tmp).eval()
    got_ranks = {n: pm2.base_model.model.get_submodule(n).r["default"] for n in LINEARS}
    assert got_ranks == {"fc1": 5, "fc2": 3, "head": 3}, got_ranks
    with torch.no_grad():
        out_t = pm2(torch.from_numpy(x))
    return rows + [
        row("rank/alpha_pattern: export_peft -> PeftModel.from_pretrained, forward", out_j, out_t)
    ]


ALL["peft_rank_alpha_pattern"] = peft_rank_alpha_pattern


def loraplus_adamw() -> list[Row]:
    """20 AdamW steps with LoRA+ (B's learning rate 16x A's): ``jax_lora.optimizer(...,
    loraplus_lr_ratio=16)`` on the linen ``{"params", "lora"}`` tree and on an NNX state vs
    PEFT's ``create_loraplus_optimizer(model, torch.optim.AdamW, ...)`` on the same MLP."""
    from flax import nnx
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio, wd, steps = 1e-2, 16.0, 0.05, 20
    pair = _Pair("peft", rank=4, alpha=8.0)
    x, y = _data(3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    topt = create_loraplus_optimizer(
        pair.torch, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio, loraplus_weight_decay=wd
    )
    for _ in range(steps):
        topt.zero_grad()
        torch.mean((pair.torch(xt) - yt) ** 2).backward()
        topt.step()
    tp = pair.torch_factor_params()
    want = [a for _, a, _ in tp] + [b for _, _, b in tp]
    make = functools.partial(optax.adamw, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)
    tx = jax_lora.optimizer(make, learning_rate=lr, loraplus_lr_ratio=ratio)

    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: int32 step count ** float
        tree = {"params": pair.params, "lora": pair.lora}

        @jax.jit
        def step(tree, state):
            g = jax.grad(lambda t: pair.jax_loss(t["lora"], x, y))(tree)
            u, state = tx.update(g, state, tree)
            return optax.apply_updates(tree, u), state

        state = tx.init(tree)
        for _ in range(steps):
            tree, state = step(tree, state)
        lora = tree["lora"]
        got = [convert.a_to_peft(lora[n]["a"]) for n in LINEARS]
        got += [convert.b_to_peft(lora[n]["b"]) for n in LINEARS]
        rows = [
            row(
                f"LoRA+ (ratio {ratio:g}) linen: A, B after {steps} AdamW steps",
                got,
                want,
                TRAIN_TOL,
            )
        ]

        class NnxMLP(nnx.Module):
            def __init__(self):
                rngs = nnx.Rngs(0)
                self.fc1 = nnx.Linear(D_IN, D_HID, rngs=rngs)
                self.fc2 = nnx.Linear(D_HID, D_HID, rngs=rngs)
                self.head = nnx.Linear(D_HID, D_OUT, rngs=rngs)

            def __call__(self, x):
                return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))

        model = jax_lora.wrap(NnxMLP(), pair.config, rngs=nnx.Rngs(1))
        for n in LINEARS:
            layer = getattr(model, n)
            layer.kernel[...] = pair.params[n]["kernel"]
            layer.bias[...] = pair.params[n]["bias"]
        jax_lora.load_lora(model, pair.lora)
        opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

        @nnx.jit
        def nnx_step(model, opt):
            loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
            grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
            opt.update(model, grads)

        for _ in range(steps):
            nnx_step(model, opt)
        lora = jax_lora.lora_state(model)
        got = [convert.a_to_peft(lora[n]["a"]) for n in LINEARS]
        got += [convert.b_to_peft(lora[n]["b"]) for n in LINEARS]
        rows.append(
            row(
                f"LoRA+ (ratio {ratio:g}) NNX: A, B after {steps} AdamW steps", got, want, TRAIN_TOL
            )
        )
        frozen = max(
            float(
                np.abs(
                    np.asarray(getattr(model, n).kernel[...]) - np.asarray(pair.params[n]["kernel"])
                ).max()
            )
            for n in LINEARS
        )
        rows.append(
            Row(
                "LoRA+ NNX: base kernels unchanged",
                frozen,
                frozen,
                0.0,
                "max_abs == 0",
                frozen == 0.0,
            )
        )
    return rows


ALL["loraplus_adamw"] = loraplus_adamw
