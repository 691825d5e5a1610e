"""Save and restore adapters alone (the ``lora`` tree, its `LoraConfig`, the step and the
optimizer state) with orbax-checkpoint; the frozen base is never written."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import uuid
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax.core import meta

from .config import INITS, LoraConfig
from .trees import check_layout, flat_paths
from .trees import check_same_layout as check_same_layout

FORMAT = "jax_lora.adapter/2"
"""The format of the `LoraConfig` record (`config_to_json`); ``/2`` added ``rank_pattern`` and
``alpha_pattern`` (a ``/1`` record, which has neither, still loads)."""
_FORMAT_1 = "jax_lora.adapter/1"

CHECKPOINT_FORMAT = "jax_lora.checkpoint/2"
"""The format of a step's ``config.json``: the config, plus shape, dtype and sha256 per array."""

_LOCK = ".lock"  # held (flock) by the one writer of a folder
_TMP = ".tmp-"  # a step being written: renamed to "<step>" when complete
_TRASH = ".deleting-"  # a pruned step: renamed out of the step names, then deleted
_log = logging.getLogger(__name__)

# what a missing, truncated or changed file raises from orbax / tensorstore / json
_FILE_ERRORS = (OSError, ValueError, KeyError)


def _is_file_error(e: BaseException) -> bool:
    """A file/format error, or orbax's plain ``Exception`` wrapping one (its array reader
    re-raises that way); anything else is a bug to let through, not a corrupt checkpoint."""
    if isinstance(e, _FILE_ERRORS):
        return True
    if type(e) is not Exception:
        return False
    cause = e.__cause__ or e.__context__
    return cause is not None and _is_file_error(cause)


_FIELDS: dict[str, str] = {
    "format": "a string",
    "rank": "an integer",
    "alpha": "a number",
    "targets": "null or a list of strings",
    "exclude": "null or a list of strings",
    "dropout": "a number",
    "init": "null or one of " + ", ".join(INITS),
    "rslora": "true or false",
    "param_dtype": "a floating dtype name",
    "rank_pattern": "an object {regex: integer}",
    "alpha_pattern": "an object {regex: number}",
    "use_dora": "true or false",
}
_OPTIONAL = {
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_dora": False,
}  # absent in a _FORMAT_1 record


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
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "use_dora": config.use_dora,
    }


def _field_ok(field: str, v: Any) -> bool:
    number = isinstance(v, (int, float)) and not isinstance(v, bool)
    if field == "format":
        return v in (FORMAT, _FORMAT_1)
    if field == "rank":
        return isinstance(v, int) and not isinstance(v, bool)
    if field in ("alpha", "dropout"):
        return number and math.isfinite(v)
    if field in ("targets", "exclude"):
        return v is None or (isinstance(v, list) and all(isinstance(p, str) for p in v))
    if field == "init":
        return v is None or v in INITS
    if field in ("rslora", "use_dora"):
        return isinstance(v, bool)
    if field in _OPTIONAL:
        want = int if field == "rank_pattern" else (int, float)
        return isinstance(v, dict) and all(
            isinstance(x, want) and not isinstance(x, bool) for x in v.values()
        )
    try:  # param_dtype
        return isinstance(v, str) and np.issubdtype(jax.numpy.dtype(v), np.floating)
    except TypeError:
        return False


def config_from_json(raw: Any) -> LoraConfig:
    """Inverse of `config_to_json` (a callable ``init`` comes back as ``"peft"``: it only
    matters when creating factors, not when using saved ones).

    Every field is checked (presence and type): a ValueError names the first bad one.
    """
    if not isinstance(raw, dict):
        raise ValueError(f"an adapter config must be a JSON object, got {type(raw).__name__}")
    if raw.get("format") == _FORMAT_1:
        raw = {**_OPTIONAL, **raw}
    elif raw.get("format") != FORMAT:
        raise ValueError(
            f"not a jax_lora adapter config (`format` {raw.get('format')!r}, expected {FORMAT!r})"
        )
    for field in sorted(set(raw) - set(_FIELDS)):
        raise ValueError(f"unknown adapter config field `{field}`; expected {sorted(_FIELDS)}")
    for field, expected in _FIELDS.items():
        if field not in raw:
            raise ValueError(f"the adapter config has no `{field}` ({expected})")
        if not _field_ok(field, raw[field]):
            raise ValueError(
                f"the adapter config's `{field}` must be {expected}, got {raw[field]!r}"
            )
    try:
        return LoraConfig(
            rank=raw["rank"],
            alpha=raw["alpha"],
            targets=raw["targets"],
            exclude=raw["exclude"],
            dropout=raw["dropout"],
            init=raw["init"] or "peft",
            rslora=raw["rslora"],
            param_dtype=jax.numpy.dtype(raw["param_dtype"]),
            rank_pattern=raw["rank_pattern"],
            alpha_pattern=raw["alpha_pattern"],
            use_dora=raw["use_dora"],
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid adapter config: {e}") from None


def _is_box(x: Any) -> bool:
    return isinstance(x, meta.AxisMetadata)


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `AdapterCheckpointer.restore` returns."""

    step: int
    lora: Any
    config: LoraConfig
    opt_state: Any | None


def _check_step(step: Any) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"a checkpoint step must be a non-negative integer, got step {step!r}")
    if step < 0:
        raise ValueError(f"a checkpoint step must be a non-negative integer, got step {step!r}")
    return int(step)


def _record(x: np.ndarray) -> dict[str, Any]:
    return {
        "shape": list(x.shape),
        "dtype": x.dtype.name,
        "sha256": hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest(),
    }


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _host(tree: Any) -> Any:
    """A host copy of every leaf: later changes (or donation) of the arrays cannot reach a
    save still being written."""
    return jax.tree.map(np.array, meta.unbox(tree))


def _check_factors_only(lora: Any) -> None:
    """The frozen base never goes into an adapter checkpoint: an NNX model or state, or a tree
    holding a quantized base weight (`jax_lora.QArray`), is refused."""
    import sys

    from .quant import is_quantized
    from .trees import keypath_str

    nnx = sys.modules.get("flax.nnx")  # not imported: `lora` cannot be one of its objects
    if nnx is not None and isinstance(lora, nnx.State):  # `nnx.state(model, nnx.LoRAParam)` is
        variables = jax.tree.leaves(lora, is_leaf=lambda x: isinstance(x, nnx.Variable))
        if variables and all(isinstance(v, nnx.LoRAParam) for v in variables):  # factors only
            return
    if nnx is not None and isinstance(lora, (nnx.Module, nnx.State)):
        raise ValueError(
            f"pass the factors (`jax_lora.lora_state(model)` or `nnx.state(model, "
            f"nnx.LoRAParam)`), not the NNX "
            f"{type(lora).__name__}: the frozen base is never written to an adapter checkpoint"
        )
    for kp, x in jax.tree_util.tree_flatten_with_path(lora, is_leaf=is_quantized)[0]:
        if is_quantized(x):
            raise ValueError(
                f"'{keypath_str(kp)}' is a quantized base weight ({x!r}), not a LoRA factor: "
                "pass the `lora` tree only (variables['lora'], `jax_lora.lora_state(model)`)"
            )


def _rebox(like: Any, values: Any) -> Any:
    """``values`` (unboxed, like's structure) in like's boxes, where like has them."""
    return jax.tree.map(
        lambda box, v: box.replace_boxed(v) if _is_box(box) else v, like, values, is_leaf=_is_box
    )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterCheckpointer:
    """Keeps the last ``max_to_keep`` adapter checkpoints under ``directory``, one per step.

    Each step is a folder ``<directory>/<step>`` holding the ``lora`` tree (``a``/``b`` arrays,
    orbax), optionally the optimizer state (orbax), and ``config.json``: the `LoraConfig` plus
    the shape, dtype and sha256 of every array, so a changed file never loads silently.

    Saves are atomic (written to a hidden folder, renamed to ``<step>`` when complete) and
    asynchronous by default: ``wait()`` blocks until written, ``close()`` waits too, and the
    error of a failed save is raised by the next ``save``/``wait``/``restore``/``close``.
    Pruning renames a step out of the step names before deleting it, so a kill at any moment
    leaves only complete steps listed. One writer per folder: the first ``save`` takes a lock
    (``<directory>/.lock``) held until ``close()``; reading needs no lock.

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
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool) or not isinstance(max_to_keep, (int, np.integer))
        ):
            raise TypeError(f"`max_to_keep` must be an integer >= 1 or None, got {max_to_keep!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"`max_to_keep` must be an integer >= 1 or None, got {max_to_keep!r}")
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"checkpoint folder {self.directory} is a file, not a folder; pass a folder path"
            )
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise type(e)(
                e.errno, f"cannot create checkpoint folder {self.directory}: {e.strerror}"
            ) from e
        self._max_to_keep = None if max_to_keep is None else int(max_to_keep)
        self._async = bool(async_save)
        self._lock_fd: int | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- steps on disk -------------------------------------------------------------------

    def _steps(self) -> list[int]:
        try:
            names = os.listdir(self.directory)
        except NotADirectoryError:
            raise NotADirectoryError(
                f"checkpoint folder {self.directory} is a file, not a folder"
            ) from None
        return sorted(
            int(n)
            for n in names
            if n.isascii()
            and n.isdigit()
            and n == str(int(n))
            and os.path.isdir(os.path.join(self.directory, n))
        )

    def latest_step(self) -> int | None:
        steps = self._steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[int]:
        return self._steps()

    # -- writing -------------------------------------------------------------------------

    def _lock_for_writing(self) -> None:
        if self._lock_fd is not None:
            return
        path = os.path.join(self.directory, _LOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 100, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RuntimeError(
                f"{self.directory} is being written by another AdapterCheckpointer ({holder}, "
                f"lock {path}); its steps are never overwritten or pruned by a second writer: "
                "close the other one first, or save to another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._lock_fd = fd
        for name in os.listdir(self.directory):  # left by a writer that was killed
            if name.startswith((_TMP, _TRASH)):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def save(self, step: int, lora: Any, config: LoraConfig, opt_state: Any = None) -> bool:
        """Save checkpoint ``step``: ``lora`` (the factor tree), ``config``, ``opt_state``.

        Pass the ``lora`` tree only — never the frozen ``params``; boxed leaves
        (``nn.Partitioned``) are saved as their values. ``step`` is a non-negative integer.
        Returns True once the save is started (or, with ``async_save=False``, done). Raises if
        ``step`` already exists (an existing checkpoint is never overwritten) or if another
        `AdapterCheckpointer` is writing to the folder.
        """
        step = _check_step(step)
        if not isinstance(config, LoraConfig):
            raise TypeError(f"`config` must be a jax_lora.LoraConfig, got {type(config).__name__}")
        if isinstance(lora, dict) and ("params" in lora or "lora" in lora):
            raise ValueError(
                "pass the `lora` tree itself (variables['lora']), not the whole variables dict: "
                "the frozen base is never written to an adapter checkpoint"
            )
        _check_factors_only(lora)
        self.wait()
        self._lock_for_writing()
        if step in self._steps():
            raise ValueError(
                f"checkpoint step {step} already exists in {self.directory}; it is not overwritten"
            )
        lora = _host(lora)
        opt_state = None if opt_state is None else _host(opt_state)
        if not self._async:
            self._write(step, lora, config, opt_state)
            return True
        self._thread = threading.Thread(  # not a daemon: exit waits for a save to finish
            target=self._write_in_background,
            args=(step, lora, config, opt_state),
            name=f"jax_lora-save-{step}",
        )
        self._thread.start()
        return True

    def _write_in_background(self, *args: Any) -> None:
        try:
            self._write(*args)
        except BaseException as e:  # kept for wait(); logged in case nobody waits
            self._error = e
            _log.error("saving an adapter checkpoint failed: %s", e)

    def _write(self, step: int, lora: Any, config: LoraConfig, opt_state: Any) -> None:
        tmp = os.path.join(self.directory, f"{_TMP}{step}-{uuid.uuid4().hex}")
        try:
            os.mkdir(tmp)
            body = {
                "format": CHECKPOINT_FORMAT,
                "config": config_to_json(config),
                "lora": {p: _record(x) for p, x in flat_paths(lora)},
                "opt_state": None
                if opt_state is None
                else [_record(x) for x in jax.tree.leaves(opt_state)],
            }
            for item, tree in (("lora", lora), ("opt_state", opt_state)):
                if tree is not None:
                    handler = ocp.StandardCheckpointHandler()
                    try:
                        path = epath.Path(tmp) / item
                        path.mkdir()
                        handler.save(path, args=ocp.args.StandardSave(tree))
                        handler.finalize(path)
                    finally:
                        handler.close()
            text = json.dumps(
                {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}, indent=1
            )
            with open(os.path.join(tmp, "config.json"), "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            os.rename(tmp, os.path.join(self.directory, str(step)))  # the commit
            _fsync_dir(self.directory)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            e.add_note(f"while saving adapter checkpoint step {step} to {self.directory}")
            raise
        self._prune()

    def _prune(self) -> None:
        if self._max_to_keep is None:
            return
        for step in self._steps()[: -self._max_to_keep]:
            trash = os.path.join(self.directory, f"{_TRASH}{step}-{uuid.uuid4().hex}")
            os.rename(os.path.join(self.directory, str(step)), trash)  # unlisted at once
            shutil.rmtree(trash, ignore_errors=True)

    def wait(self) -> None:
        """Block until a pending asynchronous save is on disk; raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        """Wait for a pending save (raising its error) and let go of the writer's lock."""
        try:
            self.wait()
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> AdapterCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------

    def _read_record(self, step_dir: str) -> tuple[dict[str, Any], LoraConfig]:
        path = os.path.join(step_dir, "config.json")
        try:
            with open(path, "rb") as f:
                raw = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is unreadable (corrupt or incomplete checkpoint): {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT!r} record (corrupt checkpoint?)")
        body = {k: v for k, v in raw.items() if k != "sha256"}
        if (
            set(body) != {"format", "config", "lora", "opt_state"}
            or raw.get("sha256") != hashlib.sha256(_canonical(body)).hexdigest()
        ):
            raise ValueError(
                f"{path} does not match the checksum saved in it: the file was changed or "
                "corrupted after it was written"
            )
        try:
            config = config_from_json(body["config"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        return body, config

    def _read_item(self, step_dir: str, item: str, target: Any, records: dict | list) -> Any:
        """Restore one orbax item and check every array against its saved sha256 (``records``:
        by path, or in leaf order)."""
        folder = os.path.join(step_dir, item)
        handler = ocp.StandardCheckpointHandler()
        try:
            out = handler.restore(epath.Path(folder), args=ocp.args.StandardRestore(target))
        except Exception as e:
            if not _is_file_error(e):
                raise
            detail = str(e).split(" [tensorstore_spec")[0]  # the spec that follows is long
            raise ValueError(
                f"checkpoint step {os.path.basename(step_dir)} ({folder}) is corrupt or "
                f"incomplete: {detail}"
            ) from e
        finally:
            handler.close()
        if isinstance(records, dict):
            pairs = [(p, x, records.get(p)) for p, x in flat_paths(out)]
            n_saved = len(records)
        else:
            leaves = jax.tree.leaves(out)
            pairs = [
                (f"[{i}]", x, r) for i, (x, r) in enumerate(zip(leaves, records, strict=False))
            ]
            n_saved = len(records) if len(leaves) == len(records) else -1
        if len(pairs) != n_saved:
            raise ValueError(f"{folder} does not hold the arrays that were saved in it")
        for path, x, rec in pairs:
            if rec is None or _record(np.asarray(x)) != rec:
                raise ValueError(
                    f"{folder}: array '{path}' does not match the checksum saved with it in "
                    "config.json: the file was changed or corrupted after it was written"
                )
        return out

    def restore(
        self, like: Any = None, *, step: int | None = None, opt_state_like: Any = None
    ) -> Restored:
        """Restore checkpoint ``step`` (default: the latest).

        Args:
          like: the model's ``lora`` tree (arrays or ``jax.ShapeDtypeStruct``s, e.g. from
            ``jax.eval_shape``; boxed or not): checked path by path and shape by shape against
            the checkpoint before any array is read. The restored arrays take its dtypes and
            shardings (the default device where it has none) and its boxes. ``None`` restores
            the tree as stored.
          step: which checkpoint.
          opt_state_like: the optimizer state's structure (e.g. ``tx.init(lora)``); needed to
            get the optimizer state back, ``None`` skips it.

        Raises:
          FileNotFoundError: no such step. ValueError: the layout differs from ``like``, or a
          file of the step is corrupt, incomplete or changed (checked against its sha256).
        """
        if like is not None and jax.tree_util.treedef_is_leaf(jax.tree.structure(like)):
            raise TypeError(
                f"`like` must be the model's lora tree, got {type(like).__name__} "
                f"{like!r}; the step is keyword-only: restore(like, step={like!r})"
            )
        if isinstance(like, dict) and ("params" in like or "lora" in like):
            raise ValueError(
                "pass the `lora` tree itself (variables['lora']) as `like`, not the whole "
                "variables dict: an adapter checkpoint holds the factors only"
            )
        self.wait()
        steps = self._steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete adapter checkpoint in {self.directory}")
            step = steps[-1]
        step = _check_step(step)
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; have {steps}"
            )
        step_dir = os.path.join(self.directory, str(step))
        record, config = self._read_record(step_dir)
        stored = record["lora"]
        if like is not None:
            like_plain = meta.unbox(like)
            want = {p: tuple(np.shape(v)) for p, v in flat_paths(like_plain)}
            have = {p: tuple(r["shape"]) for p, r in stored.items()}
            check_layout(have, want, f"checkpoint at step {step}")
            target = _abstract(like_plain, [stored[p] for p, _ in flat_paths(like_plain)])
        else:
            target = None
        lora = self._read_item(step_dir, "lora", target, stored)
        lora = _as_like(lora, like)
        opt_state = None
        if opt_state_like is not None:
            records = record["opt_state"]
            if records is None:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} has no optimizer state"
                )
            like_plain = meta.unbox(opt_state_like)
            leaves, treedef = jax.tree.flatten(like_plain)
            shapes = [tuple(np.shape(x)) for x in leaves]
            if shapes != [tuple(r["shape"]) for r in records]:
                raise ValueError(
                    f"the optimizer state at step {step} has array shapes "
                    f"{[tuple(r['shape']) for r in records]}, `opt_state_like` has {shapes}"
                )
            target = _abstract(like_plain, records)
            out = self._read_item(step_dir, "opt_state", target, records)
            # orbax gives containers back as plain tuples/dicts: re-impose the optimizer's types
            opt_state = _as_like(jax.tree.unflatten(treedef, jax.tree.leaves(out)), opt_state_like)
        return Restored(step=step, lora=lora, config=config, opt_state=opt_state)


def _sharding(x: Any) -> jax.sharding.Sharding:
    s = getattr(x, "sharding", None)
    return s if s is not None else jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def _abstract(like: Any, records: list[dict[str, Any]]) -> Any:
    """like's structure, each leaf a `jax.ShapeDtypeStruct` with the *stored* dtype (so that
    the checksum sees the saved bytes) and like's sharding."""
    leaves, treedef = jax.tree.flatten(like)
    return jax.tree.unflatten(
        treedef,
        [
            jax.ShapeDtypeStruct(
                tuple(r["shape"]), jax.numpy.dtype(r["dtype"]), sharding=_sharding(x)
            )
            for x, r in zip(leaves, records, strict=True)
        ],
    )


def _as_like(values: Any, like: Any) -> Any:
    """``values`` with like's dtypes, shardings and boxes (as stored, on device, without)."""
    if like is None:
        return jax.tree.map(jax.numpy.asarray, values)

    def cast(v: Any, x: Any) -> jax.Array:
        v = jax.numpy.asarray(v)
        dtype = getattr(x, "dtype", v.dtype)
        if v.dtype != dtype:
            v = v.astype(dtype)
        return jax.device_put(v, _sharding(x))

    plain = meta.unbox(like)
    leaves, treedef = jax.tree.flatten(plain)
    cast_leaves = [cast(v, x) for v, x in zip(jax.tree.leaves(values), leaves, strict=True)]
    return _rebox(like, jax.tree.unflatten(treedef, cast_leaves))
