"""This process's memory for the peak-RSS children of the benchmarks (run.py, quant.py): read
the current and peak RSS (Linux /proc), hand freed heap back to the OS, restart the peak."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource


def peak_rss_mib() -> float:
    """This process's peak RSS. /proc's VmHWM starts afresh at exec (and at `reset_peak`);
    getrusage's ru_maxrss does not (a child forked from a big parent inherits the parent's
    peak)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mib() -> dict[str, float]:
    """Current RSS and its parts (MiB): ``rss`` = ``anon`` (heap, arrays) + ``file`` (mapped
    files: shared libraries, memmaps) + shmem; {} where /proc is missing."""
    keys = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            k = line.split(maxsplit=1)[0]
            if k in keys:
                out[keys[k]] = int(line.split()[1]) / 1024
    return out


def release_heap() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc ``malloc_trim``):
    a loader's or the compiler's freed-but-kept heap otherwise stays in RSS. Best effort."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak() -> None:
    """Restart the peak (VmHWM) at the current RSS (Linux: ``5`` to clear_refs); best effort."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def release_and_reset_peak() -> float:
    """`release_heap`, then `reset_peak`; -> the peak so far (e.g. the loader's)."""
    release_heap()
    before = peak_rss_mib()
    reset_peak()
    return before


# glibc malloc settings for a peak-RSS child (its environment: read once, at start). By default
# glibc raises its mmap threshold to the largest block freed so far (up to 32 MiB), after which
# XLA's multi-MiB buffers come from the heap and their freed pages stay resident; a fixed 1 MiB
# threshold keeps them mmapped, so a free returns them. The same for every configuration; a user
# can set it too. SmolLM2-135M, one LoRA step: ~-20 MiB of peak.
LEAN_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def child_env() -> dict[str, str]:
    """This process's environment plus `LEAN_MALLOC_ENV`, for ``subprocess.run(env=...)``."""
    return {**os.environ, **LEAN_MALLOC_ENV}
