"""Save and restore adapters alone (the ``lora`` tree, its `LoraConfig`, the step and the
optimizer state) with orbax-checkpoint; the frozen base is never written."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from .config import LoraConfig
from .targets import path_str

FORMAT = "jax_lora.adapter/1"


def config_to_json(config: LoraConfig) -> dict[str, Any]:
    """A JSON-able dict of ``config`` (a callable ``init`` is recorded as ``null``)."""
    return {
        "format": FORMAT,
        "rank": config.rank,
        "alpha": config.alpha,
        "targets": list(config.targets) if config.targets is not None else None,
        "exclude": list(config.exclude) if config.exclude is not None else None,
        "dropout": config.dropout,
        "init": config.init if isinstance(config.init, str) else None,
        "rslora": config.rslora,
        "param_dtype": np.dtype(config.param_dtype).name,
    }


def config_from_json(raw: dict[str, Any]) -> LoraConfig:
    """Inverse of `config_to_json` (a callable ``init`` comes back as ``"peft"``: it only
    matters when creating factors, not when using saved ones)."""
    if raw.get("format") != FORMAT:
        raise ValueError(
            f"not a jax_lora adapter config (format {raw.get('format')!r}, expected {FORMAT!r})"
        )
    import jax.numpy as jnp

    return LoraConfig(
        rank=raw["rank"],
        alpha=raw["alpha"],
        targets=raw["targets"],
        exclude=raw["exclude"],
        dropout=raw["dropout"],
        init=raw["init"] or "peft",
        rslora=raw["rslora"],
        param_dtype=jnp.dtype(raw["param_dtype"]),
    )


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        path_str(str(getattr(k, "key", getattr(k, "name", k))) for k in kp): tuple(np.shape(v))
        for kp, v in flat
    }


def check_same_layout(stored: Any, like: Any, what: str = "checkpoint") -> None:
    """Raise a ValueError naming the first path where ``stored`` and ``like`` differ in
    presence or shape."""
    have, want = _flat_shapes(stored), _flat_shapes(like)
    for path in sorted(set(have) | set(want)):
        if path not in have:
            raise ValueError(
                f"the {what} has no factor '{path}' that the model needs (shape {want[path]}); targets differ?"
            )
        if path not in want:
            raise ValueError(
                f"the {what} has factor '{path}' {have[path]} that the model does not; targets differ?"
            )
        if have[path] != want[path]:
            raise ValueError(
                f"the {what} has '{path}' with shape {have[path]}, the model needs {want[path]}"
            )


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `AdapterCheckpointer.restore` returns."""

    step: int
    lora: Any
    config: LoraConfig
    opt_state: Any | None


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class AdapterCheckpointer:
    """Keeps the last ``max_to_keep`` adapter checkpoints under ``directory``, one per step.

    Each holds the ``lora`` tree (``a``/``b`` arrays only), the `LoraConfig` as JSON and,
    optionally, the optimizer state. Saves are atomic (orbax writes to a temporary folder and
    renames it when complete), so an interrupted save leaves the earlier checkpoints intact, and
    asynchronous by default (``wait()`` blocks until written; ``close()`` waits too).

    >>> import jax.numpy as jnp, jax_lora, tempfile
    >>> lora = {"fc": {"a": jnp.ones((8, 2)), "b": jnp.zeros((2, 4))}}
    >>> with jax_lora.AdapterCheckpointer(tempfile.mkdtemp()) as ckpt:
    ...     _ = ckpt.save(10, lora, jax_lora.LoraConfig(rank=2))
    ...     ckpt.wait()
    ...     r = ckpt.restore(lora)
    >>> r.step, r.config.rank, r.lora["fc"]["a"].shape
    (10, 2, (8, 2))
    """

    def __init__(
        self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
            # declared up front so that a fresh process can read metadata before any save
            item_handlers={
                "lora": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
                "opt_state": ocp.StandardCheckpointHandler(),
            },
        )

    def save(self, step: int, lora: Any, config: LoraConfig, opt_state: Any = None) -> bool:
        """Save checkpoint ``step``: ``lora`` (the factor tree), ``config``, ``opt_state``.

        Pass the ``lora`` tree only — never the frozen ``params``. Returns whether a save was
        started. Raises if ``step`` already exists (an existing checkpoint is never overwritten).
        """
        if not isinstance(config, LoraConfig):
            raise TypeError(f"`config` must be a jax_lora.LoraConfig, got {type(config).__name__}")
        if isinstance(lora, dict) and ("params" in lora or "lora" in lora):
            raise ValueError(
                "pass the `lora` tree itself (variables['lora']), not the whole variables dict: "
                "the frozen base is never written to an adapter checkpoint"
            )
        if step in self._manager.all_steps():
            raise ValueError(
                f"checkpoint step {step} already exists in {self.directory}; it is not overwritten"
            )
        items = {
            "lora": ocp.args.StandardSave(lora),
            "config": ocp.args.JsonSave(config_to_json(config)),
        }
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        return self._manager.save(step, args=ocp.args.Composite(**items))

    def restore(
        self, like: Any = None, *, step: int | None = None, opt_state_like: Any = None
    ) -> Restored:
        """Restore checkpoint ``step`` (default: the latest).

        Args:
          like: the model's ``lora`` tree (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
            ``jax.eval_shape``): checked path by path and shape by shape against the checkpoint
            before anything is read, and the restored arrays take its dtypes and shardings.
            ``None`` restores the tree as stored.
          step: which checkpoint.
          opt_state_like: the optimizer state's structure (e.g. ``tx.init(lora)``); needed to
            get the optimizer state back, ``None`` skips it.
        """
        self.wait()
        steps = self._manager.all_steps()
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete adapter checkpoint in {self.directory}")
        elif step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; have {sorted(steps)}"
            )
        try:
            meta = self._manager.item_metadata(step)["lora"]
            stored = meta.tree if hasattr(meta, "tree") else meta
            if stored is None:
                raise FileNotFoundError("no `lora` metadata")
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise ValueError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete: {e}"
            ) from e
        if like is not None:
            check_same_layout(stored, like, f"checkpoint at step {step}")
        items = {
            "lora": ocp.args.StandardRestore(_abstract(like) if like is not None else None),
            "config": ocp.args.JsonRestore(),
        }
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_like))
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise ValueError(
                f"checkpoint step {step} in {self.directory} is corrupt or incomplete: {e}"
            ) from e
        opt_state = None
        if opt_state_like is not None:
            # orbax gives containers back as plain tuples/dicts: re-impose the optimizer's types
            opt_state = jax.tree.unflatten(
                jax.tree.structure(opt_state_like), jax.tree.leaves(out["opt_state"])
            )
        return Restored(
            step=step, lora=out["lora"], config=config_from_json(out["config"]), opt_state=opt_state
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
