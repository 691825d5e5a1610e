"""``python -m torch_parity [--allow-skips]``: run every comparison and print the parity table.

Exits non-zero when a row fails, and also when a comparison is skipped (its model package is
not installed) unless ``--allow-skips`` is given: a table with missing rows is not a pass.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from torch_parity import comparisons


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m torch_parity", description=__doc__)
    parser.add_argument(
        "--allow-skips",
        action="store_true",
        help="exit 0 even if comparisons were skipped for a missing model package",
    )
    args = parser.parse_args(argv)
    rows, skipped = [], []
    for name, fn in comparisons.ALL.items():
        pkg = comparisons.missing_package(name)
        if pkg:
            skipped.append((name, pkg))
            continue
        rows += fn()
    width = max([len(r.name) for r in rows] + [len("comparison")])
    print(f"{'comparison':<{width}} | {'max-abs':>9} | {'max-rel':>9} | {'tol':>7} | pass")
    print(f"{'-' * width}-+-{'-' * 9}-+-{'-' * 9}-+-{'-' * 7}-+-----")
    for r in rows:
        print(
            f"{r.name:<{width}} | {r.max_abs:9.2e} | {r.max_rel:9.2e} | {r.tol:7.1e} | {'yes' if r.passed else 'NO'}"
        )
    for name, pkg in skipped:
        print(f"skipped: {name} (needs {pkg}; {comparisons.INSTALL_MODELS})")
    n_fail = sum(not r.passed for r in rows)
    print(
        f"\n{len(rows) - n_fail} passed, {n_fail} failed, {len(skipped)} skipped  (max-rel = max-abs / max|torch|; KS rows: max-abs = D, tol = critical D)"
    )
    if skipped and not args.allow_skips:
        print(
            f"{len(skipped)} comparison(s) skipped: not a full parity run (--allow-skips to accept)"
        )
        return 1
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
