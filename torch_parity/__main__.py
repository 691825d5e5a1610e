"""``python -m torch_parity``: run every comparison and print the parity table."""

from __future__ import annotations

import sys

from torch_parity import comparisons


def main() -> int:
    rows = []
    for name, fn in comparisons.ALL.items():
        if comparisons.missing_package(name):
            print(f"(skipped {name}: {comparisons.INSTALL_MODELS})")
            continue
        rows += fn()
    width = max(len(r.name) for r in rows)
    print(f"{'comparison':<{width}} | {'max-abs':>9} | {'max-rel':>9} | {'tol':>7} | pass")
    print(f"{'-' * width}-+-{'-' * 9}-+-{'-' * 9}-+-{'-' * 7}-+-----")
    for r in rows:
        print(
            f"{r.name:<{width}} | {r.max_abs:9.2e} | {r.max_rel:9.2e} | {r.tol:7.1e} | {'yes' if r.passed else 'NO'}"
        )
    n_fail = sum(not r.passed for r in rows)
    print(
        f"\n{len(rows) - n_fail} passed, {n_fail} failed  (max-rel = max-abs / max|torch|; KS rows: max-abs = D, tol = critical D)"
    )
    return 1 if n_fail else 0


if __name__ == "__main__":
    sys.exit(main())
