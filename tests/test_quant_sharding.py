"""Quantized kernels sharded like the kernels they replace (linen boxes, NNX Variable names)."""

import json
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from _check import assert_close

import jax_lora
from jax_lora import quant

P = jax.sharding.PartitionSpec
D = 128


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        x = x + nn.Dense(D, kernel_init=nn.with_partitioning(init, ("data", "model")), name="fc")(
            jnp.tanh(x)
        )
        logical = nn.with_logical_partitioning(init, ("embed", "mlp"))
        return nn.Dense(D, kernel_init=logical, name="up")(x)


def test_boxed_kernels_quantize_to_boxed_arrays_and_run():
    x = jax.random.normal(jax.random.key(1), (4, D))
    wrapped = jax_lora.wrap(Net(), jax_lora.LoraConfig(rank=4))
    v = wrapped.init(jax.random.key(0), x)
    lora = jax.tree.map(lambda t: t + 0.05, nn.unbox(v["lora"]))
    for kw in ({}, {"double_quant": True}):
        q = quant.quantize(v["params"], "nf4", **kw)
        fc, up = q["fc"]["kernel"], q["up"]["kernel"]
        assert quant.is_quantized(fc) and fc.shape == (D, D)
        assert type(fc.codes).__name__ == "Partitioned"
        assert type(up.codes).__name__ == "LogicallyPartitioned"
        dense = quant.dequantize(nn.unbox(q))
        y = wrapped.apply({"params": q, "lora": lora}, x)  # boxed, as `init` gives them
        assert_close(y, wrapped.apply({"params": dense, "lora": lora}, x), 1e-6)
        assert_close(jax.jit(wrapped.apply)({"params": nn.unbox(q), "lora": lora}, x), y, 1e-6)
    merged = jax_lora.merge({"params": q, "lora": lora}, wrapped.config)  # boxed like the codes
    want = jax_lora.merge({"params": nn.unbox(q), "lora": lora}, wrapped.config)
    assert type(merged["fc"]["kernel"]).__name__ == "Partitioned"
    assert type(merged["up"]["kernel"]).__name__ == "LogicallyPartitioned"
    assert nn.get_partition_spec(merged)["fc"]["kernel"] == P("data", "model")
    assert_close(nn.unbox(merged), want, 0)
    assert_close(nn.unbox(quant.dequantize(q)), quant.dequantize(nn.unbox(q)), 0)
    spec = nn.get_partition_spec(quant.quantize(v["params"], "nf4"))
    assert spec["fc"]["kernel"].codes == P("data", "model")  # (64, 128): the packed axis too
    assert spec["fc"]["kernel"].scales == P("data", "model")  # (2, 128): blocks along `data`
    assert spec["up"]["kernel"].codes == P("embed", "mlp") and spec["fc"]["bias"] == P()
    dq = nn.get_partition_spec(quant.quantize(v["params"], "nf4", double_quant=True))["fc"]
    # scales (128 * 2,) flattened out-major: `model`; their absmax (1,) and mean (): unnamed
    assert (dq["kernel"].scales, dq["kernel"].scales_scale, dq["kernel"].scales_offset) == (
        P("model"),
        P(None),
        P(),
    )
    i8 = nn.get_partition_spec(quant.quantize(v["params"], "int8"))["fc"]["kernel"]
    assert i8.codes == P("data", "model") and i8.scales == P(None, "model")  # (1, out)


def test_names_that_do_not_divide_are_dropped_when_the_mesh_is_known():
    mesh = jax.sharding.AbstractMesh((4, 2), ("data", "model"))
    x = jnp.ones((1, D))
    v = Net().init(jax.random.key(0), x)["params"]
    q = quant.quantize(v, "nf4", mesh=mesh)
    spec = nn.get_partition_spec(q)["fc"]["kernel"]
    # codes (64, 128) split 4 x 2; the 2 blocks of scales cannot split 4 ways: replicated there
    assert spec.codes == P("data", "model") and spec.scales == P(None, "model")
    with nn.logical_axis_rules((("embed", "data"), ("mlp", "model"))):
        up = nn.get_partition_spec(quant.quantize(v, "nf4", mesh=mesh))["up"]["kernel"]
    assert up.codes == P("embed", "mlp") and up.scales == P(None, "mlp")
    keep = nn.get_partition_spec(quant.quantize(v, "nf4"))["fc"]["kernel"]  # no mesh: kept
    assert keep.scales == P("data", "model")


SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
import jax_lora
from jax_lora import quant, quant_nnx

D = 128
CFG = jax_lora.LoraConfig(rank=4, alpha=8)


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), ("data", "model"))
        for i in range(2):
            x = x + nn.Dense(D, kernel_init=init, name=f"fc{i}")(jnp.tanh(x))
        return x


class NNet(nnx.Module):
    def __init__(self, rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "model"))
        self.fc0 = nnx.Linear(D, D, kernel_init=init, rngs=rngs)
        self.fc1 = nnx.Linear(D, D, kernel_init=init, rngs=rngs)

    def __call__(self, x):
        for fc in (self.fc0, self.fc1):
            x = x + fc(jnp.tanh(x))
        return x


x = jax.random.normal(jax.random.key(1), (8, D))
y = jax.random.normal(jax.random.key(2), (8, D))
wrapped = jax_lora.wrap(Net(), CFG)
v = wrapped.init(jax.random.key(0), x)
v["lora"] = jax.tree.map(lambda t: t + 0.03, v["lora"])
tx = optax.sgd(0.5)


def sgd(loss_fn, lora, *rest):
    loss, g = jax.value_and_grad(loss_fn)(lora, *rest)
    return optax.apply_updates(lora, tx.update(g, tx.init(lora))[0]), loss


def shardings(mesh, specs):
    return jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda p: isinstance(p, P))


def codes_fraction(q):
    return max(s.data.nbytes for s in q.codes.addressable_shards) / q.codes.nbytes


report = []
for shape in [(1, 1), (2, 4), (4, 2)]:
    n = shape[0] * shape[1]
    auto = (jax.sharding.AxisType.Auto,) * 2
    mesh = jax.make_mesh(shape, ("data", "model"), axis_types=auto, devices=jax.devices()[:n])
    # linen: boxes per QArray array, names from the kernel's
    boxed = {"params": quant.quantize(v["params"], "nf4", mesh=mesh), "lora": v["lora"]}
    sh = shardings(mesh, nn.get_partition_spec(boxed))
    params = jax.device_put(nn.unbox(boxed["params"]), sh["params"])
    lora = jax.device_put(nn.unbox(boxed["lora"]), sh["lora"])

    def loss(lora, params):
        return jnp.mean((wrapped.apply({"params": params, "lora": lora}, x) - y) ** 2)

    step = jax.jit(
        lambda lo, p: sgd(loss, lo, p),
        in_shardings=(sh["lora"], sh["params"]),
        out_shardings=(sh["lora"], NamedSharding(mesh, P())),
    )
    losses = []
    for _ in range(3):
        lora, value = step(lora, params)
        losses.append(float(value))
    q = params["fc0"]["kernel"]
    row = {
        "mesh": f"{shape[0]}x{shape[1]}",
        "linen_losses": losses,
        "linen_codes_fraction": codes_fraction(q),
        "linen_scales_spec": [str(a) for a in q.scales.sharding.spec],
    }
    # NNX: the Variable's names, one spec per array by quant_nnx.get_partition_spec
    with nnx.use_eager_sharding(False):
        m = NNet(nnx.Rngs(0))
    for name in ("fc0", "fc1"):
        for k, val in nn.unbox(v["params"])[name].items():
            getattr(m, name).__dict__[k].set_value(val)
    jax_lora.wrap(jax_lora.quantize(m, "nf4"), CFG)
    jax_lora.load_lora(m, nn.unbox(v["lora"]))
    graphdef, lo, rest = nnx.split(m, nnx.LoRAParam, ...)
    sh_lo = shardings(mesh, nnx.get_partition_spec(lo))
    sh_rest = shardings(mesh, quant_nnx.get_partition_spec(rest, mesh))
    lo, rest = jax.device_put(lo, sh_lo), jax.device_put(rest, sh_rest)

    def nnx_loss(lo, rest):
        return jnp.mean((nnx.merge(graphdef, lo, rest)(x) - y) ** 2)

    nstep = jax.jit(
        lambda lo, r: sgd(nnx_loss, lo, r),
        in_shardings=(sh_lo, sh_rest),
        out_shardings=(sh_lo, NamedSharding(mesh, P())),
    )
    losses = []
    for _ in range(3):
        lo, value = nstep(lo, rest)
        losses.append(float(value))
    q = rest["fc0"]["kernel"].get_value()
    row.update(
        nnx_losses=losses,
        nnx_codes_fraction=codes_fraction(q),
        nnx_scales_spec=[str(a) for a in q.scales.sharding.spec],
    )
    report.append(row)
print(json.dumps(report))
"""


def test_qlora_train_step_on_8_device_mesh_matches_single_device():
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    single, *meshes = json.loads(out.stdout.strip().splitlines()[-1])
    assert single["linen_codes_fraction"] == 1.0
    assert single["linen_losses"][-1] < single["linen_losses"][0]
    # same weights, same factors: linen and NNX train alike
    for a, b in zip(single["nnx_losses"], single["linen_losses"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for m in meshes:
        for kind in ("linen", "nnx"):
            assert m[f"{kind}_codes_fraction"] == 1 / 8, m  # each device: 1/8 of the codes
            for a, b in zip(m[f"{kind}_losses"], single[f"{kind}_losses"], strict=True):
                assert a == pytest.approx(b, rel=1e-5), (m["mesh"], kind)
    by_mesh = {m["mesh"]: m for m in meshes}
    # 2 blocks of scales over `data`: split on 2x4, replicated along `data` on 4x2
    assert by_mesh["2x4"]["linen_scales_spec"] == ["data", "model"]
    assert by_mesh["4x2"]["linen_scales_spec"] == ["None", "model"]
    assert by_mesh["4x2"]["nnx_scales_spec"] == ["None", "model"]
