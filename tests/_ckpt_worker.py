"""Run in a fresh process by test_checkpoint.py: train, save, restore, or die mid-save."""

import os
import resource
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
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


def numbered(step):
    """The factors saved at ``step`` by the kill tests: every value is ``step + i / 1000``."""
    return {
        f"layer_{i}": {
            "a": np.full((256, 8), step + i / 1000, np.float32),
            "b": np.full((8, 256), step + i / 1000, np.float32),
        }
        for i in range(3)
    }


def kill_on_nth_delete(n):
    """SIGKILL this process at its ``n``-th file or folder removal (inside a tree deletion)."""
    calls = [0]
    for name in ("unlink", "rmdir"):
        orig = getattr(os, name)

        def patched(*args, _orig=orig, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return _orig(*args, **kwargs)

        setattr(os, name, patched)


def main():
    mode, ckdir = sys.argv[1], sys.argv[2]
    if mode == "save_forever":  # until killed: steps 1, 2, ... keeping the last 2
        with jax_lora.AdapterCheckpointer(ckdir, max_to_keep=2) as ck:
            for s in range(1, 10_000):
                ck.save(s, numbered(s), CFG)
                if s == 1:  # step 1 is on disk: from here on some step must always be
                    ck.wait()
                    print("ready", flush=True)
        return
    if mode == "die_during_prune":  # steps 1, 2 kept; SIGKILL inside the deletion of step 1
        with jax_lora.AdapterCheckpointer(ckdir, max_to_keep=2, async_save=False) as ck:
            ck.save(1, numbered(1), CFG)
            ck.save(2, numbered(2), CFG)
            kill_on_nth_delete(int(sys.argv[3]))
            ck.save(3, numbered(3), CFG)
        raise SystemExit("should have been killed")
    if mode == "dir_is_file":  # the folder is a file: a clear error, then a prompt exit
        try:
            ck = jax_lora.AdapterCheckpointer(ckdir)
            ck.save(1, numbered(1), CFG)
            ck.wait()
        except OSError as e:
            print(f"raised {type(e).__name__}: {e}", flush=True)
        return
    if mode == "disk_full":  # every write past 1 KiB fails (EFBIG), as a full disk would
        ck = jax_lora.AdapterCheckpointer(ckdir, async_save=sys.argv[3] == "async")
        ck.save(1, numbered(1), CFG)
        ck.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
        try:
            ck.save(2, numbered(2), CFG)
            ck.wait()
        except OSError as e:
            print(f"raised OSError errno={e.errno}", flush=True)
        except Exception as e:
            print(f"raised {type(e).__name__}: {e}", flush=True)
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        print("entries", sorted(os.listdir(ckdir)), flush=True)
        if sys.argv[4] == "exit_without_close":  # the failed save must not hold up the exit
            return
        try:
            ck.close()
        except Exception as e:
            print(f"close raised {type(e).__name__}", flush=True)
        return
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
        elif mode == "die_during_save":  # a complete save at step 1, then SIGKILL inside step 2's
            with jax_lora.AdapterCheckpointer(ckdir, async_save=False) as ck:
                ck.save(1, lora, CFG, opt_state=state)
                orig = ocp.StandardCheckpointHandler.async_save

                async def die(self, *args, **kwargs):  # after part of step 2 is written
                    await orig(self, *args, **kwargs)
                    os.kill(os.getpid(), signal.SIGKILL)

                ocp.StandardCheckpointHandler.async_save = die
                lora2 = jax.tree.map(lambda t: t + 1.0, lora)
                ck.save(2, lora2, CFG, opt_state=state)
            raise SystemExit("should have been killed")


if __name__ == "__main__":
    main()
