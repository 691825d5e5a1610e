"""Run in a fresh process by test_checkpoint.py: train, save, restore, or die mid-save."""

import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _models import MLP

import jax_lora

CFG = jax_lora.LoraConfig(rank=4, alpha=8)
MODEL = jax_lora.wrap(MLP(), CFG)
X = jax.random.normal(jax.random.key(1), (64, 16))
Y = jax.random.normal(jax.random.key(2), (64, 4))
TX = optax.adam(3e-3)


def setup():
    v = MODEL.init(jax.random.key(0), X[:1])
    v["lora"] = jax.tree.map(lambda t: t + 0.01, v["lora"])  # b != 0 so every factor trains
    return v["params"], v["lora"], TX.init(v["lora"])


@jax.jit
def step(params, lora, state, i):
    idx = (jnp.arange(16) + 16 * i) % 64

    def loss_fn(lora):
        return jnp.mean((MODEL.apply({"params": params, "lora": lora}, X[idx]) - Y[idx]) ** 2)

    g = jax.grad(loss_fn)(lora)
    u, state = TX.update(g, state, lora)
    return optax.apply_updates(lora, u), state


def run(params, lora, state, start, stop):
    for i in range(start, stop):
        lora, state = step(params, lora, state, i)
    return lora, state


def dump(path, lora):
    flat, _ = jax.tree_util.tree_flatten_with_path(lora)
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})


def main():
    mode, ckdir = sys.argv[1], sys.argv[2]
    params, lora, state = setup()
    with jax.numpy_dtype_promotion("standard"):
        if mode == "train_and_save":  # K steps, save at K
            k = int(sys.argv[3])
            lora, state = run(params, lora, state, 0, k)
            with jax_lora.AdapterCheckpointer(ckdir) as ck:
                ck.save(k, lora, CFG, opt_state=state)
        elif mode == "restore_and_finish":  # restore latest, go on to N, dump the factors
            n, out = int(sys.argv[3]), sys.argv[4]
            with jax_lora.AdapterCheckpointer(ckdir) as ck:
                r = ck.restore(lora, opt_state_like=state)
            lora, state = run(params, r.lora, r.opt_state, r.step, n)
            dump(out, lora)
        elif mode == "straight":
            n, out = int(sys.argv[3]), sys.argv[4]
            lora, _ = run(params, lora, state, 0, n)
            dump(out, lora)
        elif (
            mode == "die_during_save"
        ):  # a complete save at step 1, then SIGKILL inside step 2's commit
            from orbax.checkpoint._src.path import atomicity

            with jax_lora.AdapterCheckpointer(ckdir, async_save=False) as ck:
                ck.save(1, lora, CFG, opt_state=state)

                async def die(*args, **kwargs):
                    os.kill(os.getpid(), signal.SIGKILL)

                for cls in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
                    cls.finalize = die
                lora2 = jax.tree.map(lambda t: t + 1.0, lora)
                ck.save(2, lora2, CFG, opt_state=state)
            raise SystemExit("should have been killed")


if __name__ == "__main__":
    main()
