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
from torch import nn as tnn

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
    _np,
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


def _gapped(tm: tnn.Module, rank: int, seed: int = 0) -> None:
    """Give every Linear of ``tm`` a spectrum with a clear gap after ``rank`` values (so the
    randomised SVD of PiSSA's ``pissa_niter_K`` converges to the exact top-``rank`` subspace)."""
    g = np.random.default_rng(seed)
    for n in LINEARS:
        lin = tm.get_submodule(n)
        o, i = lin.weight.shape
        u = np.linalg.qr(g.normal(size=(o, o)))[0][:, : min(o, i)]
        v = np.linalg.qr(g.normal(size=(i, i)))[0][:, : min(o, i)]
        s = np.where(np.arange(min(o, i)) < rank, 3.0 - 0.3 * np.arange(min(o, i)), 1e-3)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(((u * s) @ v.T).astype(np.float32)))


def _peft_init(init: str, rank: int, alpha: float, gapped: bool):
    """(original torch MLP state, PEFT model initialised with ``init``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = TorchMLP()
    if gapped:
        _gapped(base, rank)
    state = copy.deepcopy(base.state_dict())
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LINEARS), init_lora_weights=init)
    return state, get_peft_model(base, cfg)


def _torch_factors(pm) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """PEFT's (lora_A, lora_B, residual base weight) per layer, in LINEARS order."""
    layers = [pm.base_model.model.get_submodule(n) for n in LINEARS]
    return (
        [_np(m.lora_A["default"].weight) for m in layers],
        [_np(m.lora_B["default"].weight) for m in layers],
        [_np(m.base_layer.weight) for m in layers],
    )


def _ours(state, method: str, rank: int, alpha: float, niter=None):
    config = jax_lora.LoraConfig(rank=rank, alpha=alpha, targets=list(LINEARS))
    base = TorchMLP()
    base.load_state_dict(state)
    params = _flax_params(base)
    wrapped = jax_lora.wrap(FlaxMLP(), config)
    x, _ = _data()
    v = wrapped.init(jax.random.key(0), x)
    v = {"params": params, "lora": v["lora"]}
    key = jax.random.key(3) if niter is not None else None
    lora, residual = jax_lora.init_from_weights(v, config, method=method, niter=niter, key=key)
    return config, wrapped, params, lora, residual


def _align_signs(ja, jb, ta):
    """Flip each of our rank components (row i of A, column i of B) where it points against
    PEFT's: ``sign(<a_i, a_i^peft>)`` per component ``i``, applied to both factors."""
    out_a, out_b = [], []
    for a, b, t in zip(ja, jb, ta, strict=True):
        sign = np.sign(np.sum(a * t, axis=1))  # a: (r, in)
        out_a.append(a * sign[:, None])
        out_b.append(b * sign[None, :])  # b: (out, r)
    return out_a, out_b


def _rel_to(name: str, got, want, scale_ref, tol: float = 1e-5) -> Row:
    """max|got - want| relative to max|scale_ref| (for a near-zero ``want``)."""
    diff = max(
        float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(got, want, strict=True)
    )
    ref = max(float(np.abs(np.asarray(r)).max()) for r in scale_ref)
    return Row(name, diff, diff / ref, tol)


def _factors_of(pm) -> dict:
    """A PEFT MLP's factors as our ``lora`` tree."""
    out = {}
    for n in LINEARS:
        m = pm.base_model.model.get_submodule(n)
        out[n] = {
            "a": jnp.asarray(
                convert.a_from_peft(_np(m.lora_A["default"].weight), (m.in_features,))
            ),
            "b": jnp.asarray(
                convert.b_from_peft(_np(m.lora_B["default"].weight), (m.out_features,))
            ),
        }
    return out


def pissa_olora_mlp() -> list[Row]:
    """PiSSA (exact and ``pissa_niter_4``) and OLoRA initialisation vs PEFT on the small MLP:
    A, B and the residual base weights; then a "trained" PiSSA adapter converted to plain LoRA
    (rank 2r) vs PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=...)``."""
    from peft import PeftModel

    rank, alpha = 4, 8.0
    rows = []
    for init, method, niter in (("pissa", "pissa", None), ("olora", "olora", None)):
        state, pm = _peft_init(init, rank, alpha, gapped=False)
        ta, tb, tw = _torch_factors(pm)
        _, _, _, lora, residual = _ours(state, method, rank, alpha, niter)
        ja = [convert.a_to_peft(lora[n]["a"]) for n in LINEARS]
        jb = [convert.b_to_peft(lora[n]["b"]) for n in LINEARS]
        label = f"{init} init (MLP): A, B"
        if init == "pissa":  # an SVD fixes each singular pair (u_i, v_i) only up to one sign
            ja, jb = _align_signs(ja, jb, ta)
            label += " (each singular pair's sign aligned to PEFT's)"
        rows += [
            row(label, ja + jb, ta + tb),
            row(
                f"{init} init (MLP): residual base W - s*B@A",
                [convert.kernel_to_torch(residual[n]["kernel"]) for n in LINEARS],
                tw,
            ),
        ]

    # the randomised SVD: factors are defined up to a rotation; compare s*B@A and the residual
    state, pm = _peft_init("pissa_niter_4", rank, alpha, gapped=True)
    ta, tb, tw = _torch_factors(pm)
    config, wrapped, params, lora, residual = _ours(state, "pissa", rank, alpha, niter=4)
    s = config.scale
    rows += [
        row(
            "pissa_niter_4 init (MLP, gapped spectrum): s*B@A",
            [
                s * convert.b_to_peft(lora[n]["b"]) @ convert.a_to_peft(lora[n]["a"])
                for n in LINEARS
            ],
            [s * b @ a for a, b in zip(ta, tb, strict=True)],
        ),
        _rel_to(
            "pissa_niter_4 init (MLP, gapped spectrum): residual base, error / max|W|",
            [convert.kernel_to_torch(residual[n]["kernel"]) for n in LINEARS],
            tw,
            [_np(state[f"{n}.weight"]) for n in LINEARS],
        ),
    ]

    # conversion: PiSSA init, "train" (perturb A, B), convert for the original base
    state, pm = _peft_init("pissa", rank, alpha, gapped=False)
    config, wrapped, params, _, residual = _ours(state, "pissa", rank, alpha)
    x, _ = _data()
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(f"{tmp}/init")
        lora0 = _factors_of(pm)  # PEFT's initial factors (ours differ by signs only)
        g = np.random.default_rng(7)
        with torch.no_grad():
            for n in LINEARS:
                m = pm.base_model.model.get_submodule(n)
                for p in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    p.add_(torch.from_numpy((0.1 * g.normal(size=p.shape)).astype(np.float32)))
            out_t = pm.eval()(torch.from_numpy(x))
        trained = _factors_of(pm)
        out_j = wrapped.apply({"params": residual, "lora": trained}, x)
        rows.append(row("pissa trained (MLP): forward on the residual base", out_j, out_t))
        pm.save_pretrained(f"{tmp}/lora", path_initial_model_for_weight_conversion=f"{tmp}/init")
        plain, plain_cfg = jax_lora.convert_to_lora(trained, lora0, config)
        peft_plain, peft_cfg = jax_lora.import_peft(f"{tmp}/lora")
        assert (plain_cfg.rank, plain_cfg.alpha) == (peft_cfg.rank, peft_cfg.alpha), peft_cfg
        rows.append(
            row(
                "pissa -> plain LoRA (rank 2r) vs PEFT's conversion: A, B",
                [plain[n][k] for n in LINEARS for k in "ab"],
                [peft_plain[n][k] for n in LINEARS for k in "ab"],
            )
        )
        out_plain = jax_lora.wrap(FlaxMLP(), plain_cfg).apply({"params": params, "lora": plain}, x)
        fresh = TorchMLP()
        fresh.load_state_dict(state)
        with torch.no_grad():
            out_t2 = PeftModel.from_pretrained(fresh, f"{tmp}/lora").eval()(torch.from_numpy(x))
        rows += [
            row("pissa -> plain LoRA on the original base: forward vs PEFT's", out_plain, out_t2),
            row("pissa -> plain LoRA on the original base = trained PiSSA model", out_plain, out_t),
        ]
    return rows


ALL["pissa_olora_mlp"] = pissa_olora_mlp


def _pissa_vs_float64(label, ja, jb, jw, ta, tb, tw, originals, scale) -> list[Row]:
    """PiSSA factors of real weights judged against a float64 SVD: singular vectors of close
    singular values (MiniLM's differ by ~1%) carry fp32 errors of ~1e-4 in any fp32 SVD, PEFT's
    included: ours must be within 4x PEFT's own distance to the float64 truth (or 1e-5)."""
    refs = [_pissa64(w, ta[0].shape[0], scale) for w in originals]
    signs = [np.sign(np.sum(r[0] * t, axis=1)) for r, t in zip(refs, ta, strict=True)]
    exact_ab = [r[0] * g[:, None] for r, g in zip(refs, signs, strict=True)]
    exact_ab += [r[1] * g[None, :] for r, g in zip(refs, signs, strict=True)]
    out = []
    for what, ours, peft, exact in (
        ("A, B", ja + jb, ta + tb, exact_ab),
        ("residual base", jw, tw, [r[2] for r in refs]),
    ):
        ref = max(float(np.abs(e).max()) for e in exact)

        def err(xs, exact=exact, ref=ref):
            return max(float(np.abs(x - e).max()) for x, e in zip(xs, exact, strict=True)) / ref

        mine, theirs = err(ours), err(peft)
        out.append(
            Row(
                f"{label}: {what}, error vs a float64 SVD (PEFT's own: {theirs:.2g})",
                mine * ref,
                mine,
                max(4 * theirs, 1e-5),
                "max_rel <= max(4 x PEFT's error, 1e-5)",
            )
        )
    return out


def _pissa64(w: np.ndarray, rank: int, scale: float):
    """PEFT's PiSSA formulas on torch's ``(out, in)`` weight in float64: (A, B, residual)."""
    v, s, uh = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
    root = np.sqrt(s[:rank] / scale)
    a, b = root[:, None] * uh[:rank], v[:, :rank] * root[None, :]
    return a, b, np.asarray(w, np.float64) - scale * b @ a


def pissa_olora_minilm() -> list[Row]:
    """PiSSA and OLoRA initialisation on the real all-MiniLM-L6-v2 (query/value, r=8) vs PEFT:
    A, B and the residual base weights of the first and last layers (SVDs of real weights cost
    seconds on 2 cores), and the forward of the residual model    with its factors (padding positions excluded)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from .comparisons import _minilm

    bert, d, cfg, ids, mask = _minilm()
    params = bert.load_params(d, cfg)
    keep = mask.astype(bool)
    rank, alpha = 8, 16.0
    config = jax_lora.LoraConfig(
        rank=rank, alpha=alpha, targets=r"encoder/layer_(0|5)/attention/self/(query|value)"
    )
    wrapped = jax_lora.wrap(bert.Bert(cfg), config)
    init = jax_lora.init_lora(wrapped, jax.random.key(0), {"params": params}, ids, mask)
    paths = [
        f"encoder/layer_{i}/attention/self/{p}"
        for i in (0, cfg.num_hidden_layers - 1)
        for p in ("query", "value")
    ]
    rows = []
    hf0 = transformers.BertModel.from_pretrained(
        d, add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    for method in ("pissa", "olora"):
        pm = get_peft_model(
            copy.deepcopy(hf0),
            LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=r".*\.layer\.(0|5)\.attention\.self\.(query|value)",
                init_lora_weights=method,
            ),
        ).eval()
        with torch.no_grad():
            out_t = pm(
                input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)
            ).last_hidden_state
        lora, residual = jax_lora.init_from_weights(
            {"params": params, "lora": init}, config, method=method
        )

        def at(tree, path):
            for k in path.split("/"):
                tree = tree[k]
            return tree

        mods = [pm.base_model.model.get_submodule(bert.torch_name(p)) for p in paths]
        ta = [_np(m.lora_A["default"].weight) for m in mods]
        tb = [_np(m.lora_B["default"].weight) for m in mods]
        tw = [_np(m.base_layer.weight) for m in mods]
        ja = [convert.a_to_peft(at(lora, p)["a"]) for p in paths]
        jb = [convert.b_to_peft(at(lora, p)["b"]) for p in paths]
        jw = [convert.kernel_to_torch(at(residual, p)["kernel"]) for p in paths]
        label = f"MiniLM-L6 {method} init q,v r={rank} (layers 0, 5)"
        out_j = wrapped.apply({"params": residual, "lora": lora}, ids, mask)
        if method == "pissa":
            ja, jb = _align_signs(ja, jb, ta)
            originals = [convert.kernel_to_torch(at(params, p)["kernel"]) for p in paths]
            rows += _pissa_vs_float64(label, ja, jb, jw, ta, tb, tw, originals, config.scale)
            rows.append(row(f"{label}: A, B vs PEFT (sign-aligned)", ja + jb, ta + tb, 1e-3))
        else:
            rows += [
                row(f"{label}: A, B", ja + jb, ta + tb),
                row(f"{label}: residual base", jw, tw),
            ]
        rows.append(row(f"{label}: forward", np.asarray(out_j)[keep], _np(out_t)[keep]))
    return rows


ALL["pissa_olora_minilm"] = pissa_olora_minilm
