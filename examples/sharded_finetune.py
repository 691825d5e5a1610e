"""Sharded LoRA fine-tuning with JAX's own SPMD: a scanned decoder on a (data, model) mesh.

The base weights carry logical axis names (``nn.with_logical_partitioning``); LoRA factors
inherit them (``a`` takes the kernel's input axes, ``b`` its output axes, the rank axis is
replicated). Logical rules map names to the mesh: ``embed`` -> ``data`` (FSDP: weights sharded
over the data axis too) and ``mlp``/``heads``/``vocab`` -> ``model`` (tensor parallel). One
jitted train step with ``in_shardings``/``out_shardings`` and donated buffers does the rest.

    python examples/sharded_finetune.py --simulate-devices 8 --mesh 4x2
    python examples/sharded_finetune.py --simulate-devices 8 --mesh 1x1,8x1,4x2,2x4 --json

With several meshes, each is trained from the same weights and compared to the first.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--simulate-devices",
        type=int,
        default=0,
        help="fake N CPU devices (sets XLA_FLAGS; CPU only)",
    )
    p.add_argument(
        "--mesh",
        default="",
        help="DATAxMODEL, comma-separated for several (default: all devices x 1)",
    )
    p.add_argument("--layers", type=int, default=2, help="decoder blocks (stacked with nn.scan)")
    p.add_argument("--d-model", type=int, default=64, help="model width")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq", type=int, default=32, help="sequence length")
    p.add_argument(
        "--batch", type=int, default=16, help="global batch size (divisible by the data axis)"
    )
    p.add_argument("--steps", type=int, default=8, help="train steps")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument(
        "--optimizer",
        default="adam",
        choices=["adam", "sgd"],
        help="optax optimizer for the factors",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 3e-3 adam, 0.5 sgd)"
    )
    p.add_argument(
        "--no-fsdp",
        action="store_true",
        help="replicate weights over the data axis (tensor parallel only)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object with the results")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.simulate_devices:
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={ARGS.simulate_devices}"
    )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_lora  # noqa: E402

VOCAB = 256  # bytes
RULES = (
    ("batch", "data"),
    ("embed", "data"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("layers", None),
)
TP_ONLY_RULES = (("embed", None), *(r for r in RULES if r[0] != "embed"))


def _init(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


class Block(nn.Module):
    d: int
    heads: int

    @nn.compact
    def __call__(self, x, _):
        hd = self.d // self.heads
        h = nn.LayerNorm(name="ln1")(x)
        q = nn.DenseGeneral(
            (self.heads, hd), kernel_init=_init(("embed", "heads", "kv")), name="query"
        )(h)
        k = nn.DenseGeneral(
            (self.heads, hd), kernel_init=_init(("embed", "heads", "kv")), name="key"
        )(h)
        v = nn.DenseGeneral(
            (self.heads, hd), kernel_init=_init(("embed", "heads", "kv")), name="value"
        )(h)
        t = x.shape[1]
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, jnp.finfo(s.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
        x = x + nn.DenseGeneral(
            self.d, axis=(-2, -1), kernel_init=_init(("heads", "kv", "embed")), name="out"
        )(att)
        h = nn.LayerNorm(name="ln2")(x)
        h = nn.gelu(nn.Dense(4 * self.d, kernel_init=_init(("embed", "mlp")), name="fc1")(h))
        return x + nn.Dense(self.d, kernel_init=_init(("mlp", "embed")), name="fc2")(h), None


class Decoder(nn.Module):
    """Byte-level decoder; blocks stacked with ``nn.scan`` (leading ``layers`` axis) and remat."""

    layers: int
    d: int
    heads: int

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            VOCAB,
            self.d,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(0.02), ("vocab", "embed")
            ),
            name="embed",
        )(tokens)
        stack = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0, "lora": 0},  # LoRA factors get the layer axis too
            split_rngs={"params": True},
            length=self.layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.d, self.heads, name="blocks")(x, None)
        return nn.Dense(VOCAB, kernel_init=_init(("embed", "vocab")), name="head")(
            nn.LayerNorm(name="ln_f")(x)
        )


def corpus_batches(batch: int, seq: int, steps: int) -> np.ndarray:
    """(steps, batch, seq + 1) byte windows from this library's own source files."""
    root = pathlib.Path(jax_lora.__file__).parent
    data = np.frombuffer(b"".join(p.read_bytes() for p in sorted(root.glob("*.py"))), np.uint8)
    rng = np.random.default_rng(0)
    starts = rng.integers(0, len(data) - seq - 1, (steps, batch))
    return np.stack([[data[s : s + seq + 1] for s in row] for row in starts]).astype(np.int32)


def train_on_mesh(mesh_shape, args, model, config, params0, lora0, batches):
    """Train from (params0, lora0) on a mesh; returns losses, factors and sharding facts."""
    n = mesh_shape[0] * mesh_shape[1]
    auto = (jax.sharding.AxisType.Auto,) * 2  # let XLA propagate shardings of activations
    mesh = jax.make_mesh(mesh_shape, ("data", "model"), axis_types=auto, devices=jax.devices()[:n])
    abstract = jax.eval_shape(model.init, jax.random.key(0), batches[0, :, :-1])
    rules = TP_ONLY_RULES if args.no_fsdp else RULES
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
    params_sh, lora_sh = shardings["params"], shardings["lora"]
    params = jax.device_put(params0, params_sh)
    lora = jax.device_put(lora0, lora_sh)
    tx = optax.adam(args.lr or 3e-3) if args.optimizer == "adam" else optax.sgd(args.lr or 0.5)
    opt_sh = optax.tree_map_params(
        tx,
        lambda _, s: s,
        jax.eval_shape(tx.init, lora0),
        lora_sh,
        transform_non_params=lambda _: NamedSharding(mesh, P()),
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(lora)
    batch_sh = NamedSharding(mesh, P("data"))

    def loss_fn(lora, params, tokens):
        logits = model.apply({"params": params, "lora": lora}, tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @jax.jit
    def step(lora, opt_state, params, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, tokens)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    step = jax.jit(
        step,
        in_shardings=(lora_sh, opt_sh, params_sh, batch_sh),
        out_shardings=(lora_sh, opt_sh, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )
    losses = []
    for i in range(len(batches)):
        lora, opt_state, loss = step(lora, opt_state, params, jax.device_put(batches[i], batch_sh))
        losses.append(float(loss))

    def per_device_bytes(tree):
        d0 = mesh.devices.flat[0]
        return sum(
            s.data.nbytes
            for x in jax.tree.leaves(tree)
            for s in x.addressable_shards
            if s.device == d0
        )

    same = jax.tree.leaves(
        jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), params, params_sh)
    )
    same_lora = jax.tree.leaves(
        jax.tree.map(lambda x, s: x.sharding.is_equivalent_to(s, x.ndim), lora, lora_sh)
    )
    kernel = params["blocks"]["fc1"]["kernel"]
    return {
        "mesh": f"{mesh_shape[0]}x{mesh_shape[1]}",
        "losses": losses,
        "lora": jax.device_get(lora),
        "params_keep_sharding": all(same),
        "lora_keep_sharding": all(same_lora),
        "fc1_kernel_spec": list(kernel.sharding.spec),
        "fc1_a_spec": list(lora["blocks"]["fc1"]["a"].sharding.spec),
        "fc1_b_spec": list(lora["blocks"]["fc1"]["b"].sharding.spec),
        "param_bytes_per_device": per_device_bytes(params),
    }


def main(args) -> dict:
    meshes = (
        [tuple(int(v) for v in m.split("x")) for m in args.mesh.split(",")]
        if args.mesh
        else [(len(jax.devices()), 1)]
    )
    for d, m in meshes:
        if d * m > len(jax.devices()):
            sys.exit(
                f"mesh {d}x{m} needs {d * m} devices, have {len(jax.devices())} (try --simulate-devices {d * m})"
            )
        if args.batch % d:
            sys.exit(f"--batch {args.batch} is not divisible by the data axis {d}")
    model_def = Decoder(args.layers, args.d_model, args.heads)
    config = jax_lora.LoraConfig(
        rank=args.rank, alpha=2 * args.rank, targets=r".*/(query|value|out|fc1|fc2)"
    )
    model = jax_lora.wrap(model_def, config)
    batches = corpus_batches(args.batch, args.seq, args.steps)
    variables = nn.unbox(jax.jit(model.init)(jax.random.key(0), batches[0, :, :-1]))
    # b = 0 at init gives a = 0 gradients on step 1; start from small random b so every factor moves
    lora0 = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            0.01 * jax.random.normal(jax.random.key(len(str(p))), x.shape)
            if str(p[-1]) == "['b']"
            else x
        ),
        variables["lora"],
    )
    # host copies: each mesh gets its own device buffers (the train step donates the factors)
    params0, lora0 = jax.device_get(variables["params"]), jax.device_get(lora0)
    results = [train_on_mesh(m, args, model, config, params0, lora0, batches) for m in meshes]
    ref = results[0]
    report = {
        "devices": len(jax.devices()),
        "platform": jax.devices()[0].platform,
        "params": jax_lora.param_report(variables).total,
        "meshes": [],
    }
    for r in results:
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref["losses"], strict=True))
        pairs = list(
            zip(
                jax.tree.leaves(r["lora"]),
                jax.tree.leaves(ref["lora"]),
                jax.tree.leaves(lora0),
                strict=True,
            )
        )
        lora_err = max(float(np.abs(x - y).max() / np.abs(y).max()) for x, y, _ in pairs)
        # the training updates alone (final - initial factors): the stricter comparison
        update_err = max(
            float(np.abs((x - x0) - (y - x0)).max() / np.abs(y - x0).max()) for x, y, x0 in pairs
        )
        report["meshes"].append(
            {k: v for k, v in r.items() if k != "lora"}
            | {
                "max_loss_rel_vs_first": loss_err,
                "max_lora_rel_vs_first": lora_err,
                "max_update_rel_vs_first": update_err,
            }
        )
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['devices']} {report['platform']} devices, {report['params']:,} params, LoRA rank {args.rank} on q,v,out,fc1,fc2 of {args.layers} scanned blocks"
        )
        print(
            "mesh  | loss first -> last | vs first mesh (loss, factors, updates) | base bytes/device | fc1 kernel / a / b specs"
        )
        for m in report["meshes"]:
            print(
                f"{m['mesh']:5s} | {m['losses'][0]:.3f} -> {m['losses'][-1]:.3f}     | {m['max_loss_rel_vs_first']:.1e}, {m['max_lora_rel_vs_first']:.1e}, "
                f"{m['max_update_rel_vs_first']:.1e}      | {m['param_bytes_per_device']:>17,} | {m['fc1_kernel_spec']} / {m['fc1_a_spec']} / {m['fc1_b_spec']}"
            )
    return report


if __name__ == "__main__":
    main(ARGS)
