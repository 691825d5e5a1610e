"""Which module paths a `LoraConfig` adapts, and the errors when its patterns miss."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from .config import LoraConfig

SUPPORTED = (
    "flax's Dense, DenseGeneral, Einsum (linen) and Linear, LinearGeneral, Einsum (nnx), and any "
    "layer's weight that feeds a matmul, einsum, convolution or row lookup"
)


def path_str(path: Iterable[object]) -> str:
    """Module path as the ``/``-joined string that `LoraConfig.targets` patterns match."""
    return "/".join(str(p) for p in path)


def _any(patterns: Sequence[str] | None, path: str) -> bool:
    return patterns is not None and any(re.fullmatch(p, path) for p in patterns)


def is_target(config: LoraConfig, path: str) -> bool:
    """Whether a supported layer at ``path`` gets LoRA factors under ``config``."""
    if _any(config.exclude, path):
        return False
    return config.targets is None or _any(config.targets, path)


def explicitly_targeted(config: LoraConfig, path: str) -> bool:
    """Whether an explicit ``targets`` pattern names ``path`` (and ``exclude`` does not)."""
    return config.targets is not None and is_target(config, path)


def check_all_matched(
    config: LoraConfig,
    candidates: Sequence[tuple[str, str]],
    containers: Sequence[tuple[str, str]] = (),
) -> None:
    """Raise if a ``targets`` pattern matched none of ``candidates`` ((path, type) pairs).

    ``containers`` are matched modules that hold other modules; they feed a hint."""
    paths = [p for p, _ in candidates]
    if not paths:
        raise ValueError(
            f"the model has no layer LoRA can adapt; supported layer types: {SUPPORTED}."
        )
    listing = "\n".join(f"  {p}  ({t})" for p, t in candidates[:50])
    if len(candidates) > 50:
        listing += f"\n  ... and {len(candidates) - 50} more"
    if config.targets == ():
        raise ValueError(
            "`targets` is empty, so it matches no layer. Pass `targets=None` to adapt every "
            f"supported layer, or list regexes of module paths. Candidate paths:\n{listing}"
        )
    for pattern in config.targets or ():
        matched = [p for p in paths if re.fullmatch(pattern, p)]
        if matched and not any(is_target(config, p) for p in matched):
            excluded = "\n".join(
                f"  {p}  (excluded by `exclude` pattern "
                f"{next(e for e in config.exclude or () if re.fullmatch(e, p))!r})"
                for p in matched[:50]
            )
            raise ValueError(
                f"`targets` pattern {pattern!r} matches only layers that `exclude` removes:\n"
                f"{excluded}\nNarrow `exclude` or drop the pattern from `targets`."
            )
        if not matched:
            more = ""
            hits = [(p, t) for p, t in containers if re.fullmatch(pattern, p)]
            if hits:
                p, t = hits[0]
                more = (
                    f"\nIt matches '{p}' ({t}), which holds layers but is not one; "
                    f"did you mean {pattern + '/.*'!r}?"
                )
            raise ValueError(
                f"`targets` pattern {pattern!r} matches no supported layer (patterns are "
                f"matched with re.fullmatch against the '/'-joined module path). "
                f"Candidate paths:\n{listing}{more}"
            )
    if not any(is_target(config, p) for p in paths):
        excl = tuple(config.exclude or ())
        patterns = ("pattern " if len(excl) == 1 else "patterns ") + ", ".join(map(repr, excl))
        raise ValueError(
            f"`exclude` {patterns} excludes every supported layer, so nothing is "
            f"adapted. Excluded paths:\n{listing}"
        )


def unsupported_error(path: str, type_name: str) -> ValueError:
    return ValueError(
        f"`targets` matches module '{path}' of type {type_name}, which LoRA cannot adapt "
        f"(supported: {SUPPORTED}). Narrow the pattern, or add '{path}' to `exclude`."
    )


def weight_path(module_path: str, name: str) -> str:
    """The path of a weight: its module's path, ``/``, its name (``h/0/attn/c_attn/kernel``)."""
    return f"{module_path}/{name}" if module_path else name


def weight_targeted(config: LoraConfig, module_path: str, name: str) -> bool:
    """Whether weight ``name`` of the module at ``module_path`` is targeted: a pattern fully
    matches the weight path or the module path, and no ``exclude`` pattern matches either."""
    paths = (weight_path(module_path, name), module_path)
    if any(_any(config.exclude, p) for p in paths):
        return False
    return config.targets is None or any(_any(config.targets, p) for p in paths)


def class_name(obj: object) -> str:
    """The full class name (``gemma.gm.nn._layers.Einsum``), never a bare ``Einsum``."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
