"""`LoraConfig`: what to adapt, at which rank and scale, and how to initialise it."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

INITS = ("peft", "gaussian", "seed")
"""Named initialisations of the input-side factor ``a`` (``b`` always starts at zero).

- ``"peft"``: PEFT's default, kaiming-uniform with ``a=sqrt(5)``: ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
- ``"gaussian"``: PEFT's ``init_lora_weights="gaussian"``: ``N(0, (1/rank)^2)``.
- ``"seed"``: the seed document's ``N(0, 1)``.
"""

Initializer = Callable[[Any, tuple[int, ...], Any], Any]


def _patterns(field: str, value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise TypeError(
            f"`{field}` must be a regex string or a list of regex strings, got {type(value).__name__}"
        ) from None
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"`{field}` entries must be regex strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"`{field}` pattern {pattern!r} is not a valid regex: {e}") from None
    return value


def _pattern_map(
    field: str, value: Any, check: Callable[[str, Any], Any]
) -> tuple[tuple[str, Any], ...]:
    """``{regex: value}`` (or pairs) -> a hashable tuple of pairs, each checked."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = list(value.items())
    else:
        try:
            items = [tuple(kv) for kv in value]
        except TypeError:
            items = None
        if isinstance(value, str) or items is None or any(len(kv) != 2 for kv in items):
            raise TypeError(
                f"`{field}` must be a dict {{regex: value}}, got {type(value).__name__} {value!r}"
            )
    out = []
    for pattern, v in items:
        if not isinstance(pattern, str):
            raise TypeError(f"`{field}` keys must be regex strings, got {pattern!r}")
        if any(pattern == p for p, _ in out):
            raise ValueError(f"`{field}` lists the pattern {pattern!r} twice")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"`{field}` pattern {pattern!r} is not a valid regex: {e}") from None
        out.append((pattern, check(pattern, v)))
    return tuple(out)


def _rank_value(pattern: str, r: Any) -> int:
    if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer)):
        raise TypeError(f"`rank_pattern`[{pattern!r}] must be an int >= 1, got {r!r}")
    if r < 1:
        raise ValueError(f"`rank_pattern`[{pattern!r}] must be an int >= 1, got {r}")
    return int(r)


def _alpha_value(pattern: str, alpha: Any) -> float:
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.number)):
        raise TypeError(f"`alpha_pattern`[{pattern!r}] must be a number > 0, got {alpha!r}")
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"`alpha_pattern`[{pattern!r}] must be a finite number > 0, got {alpha}")
    return float(alpha)


def pattern_key(patterns: Sequence[tuple[str, Any]], path: str) -> str | None:
    """The first pattern of ``patterns`` that matches ``path`` as PEFT's ``get_pattern_key``
    does (the whole path, or a ``/``-separated suffix of it), else None."""
    for pattern, _ in patterns:
        if re.fullmatch(rf"(?:.*/)?(?:{pattern})", path):
            return pattern
    return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which layers get LoRA factors and how they behave. Validated on construction.

    Each targeted layer with kernel ``W: (in..., out...)`` gets ``a: (in..., rank)`` and
    ``b: (rank, out...)`` and computes ``y = base(x) + scale * (dropout(x) @ a) @ b``.

    Args:
      rank: the rank ``r`` of the update, ``>= 1``.
      alpha: the LoRA alpha; ``scale = alpha / rank`` (or ``alpha / sqrt(rank)`` with
        ``rslora``). Defaults to ``rank``, i.e. scale 1.
      targets: a regex, or a list of regexes, matched with ``re.fullmatch`` against each
        layer's module path joined with ``/`` (e.g. ``r".*/attention/(query|value)"``).
        ``None`` (default) adapts every supported layer (``Dense``, ``DenseGeneral``,
        ``Einsum``), like PEFT's ``"all-linear"``.
      exclude: regex(es) of paths never adapted, even if ``targets`` matches them.
      dropout: dropout rate on the LoRA branch input only (as PEFT), in ``[0, 1)``.
      init: ``"peft"`` (default), ``"gaussian"``, ``"seed"`` (see `INITS`) or a callable
        ``init(key, shape, dtype)`` for ``a``; ``b`` always starts at zero, so a freshly
        wrapped model returns exactly the base model's output.
      rslora: use rank-stabilised scaling ``alpha / sqrt(rank)``.
      param_dtype: dtype of ``a`` and ``b`` (default float32, also for a bf16 base).
      rank_pattern: ``{regex: rank}`` overriding ``rank`` per layer (PEFT's ``rank_pattern``).
        A key matches the path of a layer's factors in the ``lora`` tree (a Dense-family
        layer's module path, another layer's weight path such as ``"embed/embedding"``) as
        PEFT matches module names: the whole path or a ``/``-separated suffix of it
        (``"query"`` matches ``"encoder/layer_0/query"``; a leading ``^`` pins the whole path);
        the first matching key wins. A key
        that matches no adapted layer is an error when the factors are created. Stored as a
        tuple of ``(regex, rank)`` pairs (hashable); read it with `rank_for`.
      alpha_pattern: ``{regex: alpha}`` overriding ``alpha`` per layer, matched the same way
        (PEFT's ``alpha_pattern``); read it with `scale_for`.
      use_dora: DoRA (PEFT's ``use_dora=True``): each adapted kernel also gets a trainable
        magnitude ``m: (out...)`` and computes ``m * (W + s·a@b) / ‖W + s·a@b‖`` (the norm over
        the input axes, a constant in backprop); see `jax_lora.dora`.

    >>> from jax_lora import LoraConfig
    >>> cfg = LoraConfig(rank=8, alpha=16, targets=r".*/(query|value)")
    >>> cfg.scale
    2.0
    """

    rank: int
    alpha: float | None = None
    targets: str | Sequence[str] | None = None
    exclude: str | Sequence[str] | None = None
    dropout: float = 0.0
    init: str | Initializer = "peft"
    rslora: bool = False
    param_dtype: Any = np.float32
    rank_pattern: Mapping[str, int] | Sequence[tuple[str, int]] | None = ()
    alpha_pattern: Mapping[str, float] | Sequence[tuple[str, float]] | None = ()
    use_dora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rank, (bool, np.bool_)) or not isinstance(self.rank, (int, np.integer)):
            raise TypeError(f"`rank` must be an int >= 1, got {self.rank!r}")
        if self.rank < 1:
            raise ValueError(f"`rank` must be >= 1, got {self.rank}")
        object.__setattr__(self, "rank", int(self.rank))
        alpha = self.rank if self.alpha is None else self.alpha
        if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (int, float, np.number)):
            raise TypeError(f"`alpha` must be a number, got {alpha!r}")
        if not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"`alpha` must be a finite number > 0, got {alpha}")
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "targets", _patterns("targets", self.targets))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))
        dropout = self.dropout
        if isinstance(dropout, (bool, np.bool_)) or not isinstance(
            dropout, (int, float, np.number)
        ):
            raise TypeError(f"`dropout` must be a number in [0, 1), got {dropout!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
        object.__setattr__(self, "dropout", float(dropout))
        if not isinstance(self.rslora, (bool, np.bool_)):
            raise TypeError(
                f"`rslora` must be a bool (True or False), got {self.rslora!r} of type "
                f"{type(self.rslora).__name__}"
            )
        object.__setattr__(self, "rslora", bool(self.rslora))
        if isinstance(self.init, str):
            if self.init not in INITS:
                raise ValueError(f"`init` must be one of {INITS} or a callable, got {self.init!r}")
        elif not callable(self.init):
            raise TypeError(f"`init` must be one of {INITS} or a callable, got {self.init!r}")
        if self.param_dtype is None:  # np.dtype(None) silently means float64
            raise TypeError("`param_dtype` must be a floating dtype such as jnp.float32, got None")
        try:
            dtype = np.dtype(self.param_dtype)
        except TypeError:
            raise TypeError(f"`param_dtype` must be a dtype, got {self.param_dtype!r}") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"`param_dtype` must be a floating dtype, got {dtype}")
        object.__setattr__(self, "param_dtype", dtype)
        rp = _pattern_map("rank_pattern", self.rank_pattern, _rank_value)
        object.__setattr__(self, "rank_pattern", rp)
        ap = _pattern_map("alpha_pattern", self.alpha_pattern, _alpha_value)
        object.__setattr__(self, "alpha_pattern", ap)
        if not isinstance(self.use_dora, (bool, np.bool_)):
            raise TypeError(
                f"`use_dora` must be a bool (True or False), got {self.use_dora!r} of type "
                f"{type(self.use_dora).__name__}"
            )
        object.__setattr__(self, "use_dora", bool(self.use_dora))

    @property
    def scale(self) -> float:
        """The factor on ``a @ b``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with ``rslora``."""
        return self._scale(self.alpha, self.rank)

    def _scale(self, alpha: float, rank: int) -> float:
        return alpha / (math.sqrt(rank) if self.rslora else rank)

    def rank_for(self, path: str) -> int:
        """The rank of the layer whose factors sit at ``path`` (``rank_pattern``, else ``rank``).

        >>> cfg = LoraConfig(rank=8, rank_pattern={"value": 4})
        >>> cfg.rank_for("layer_0/attention/value"), cfg.rank_for("layer_0/attention/query")
        (4, 8)
        """
        key = pattern_key(self.rank_pattern, path)
        return self.rank if key is None else dict(self.rank_pattern)[key]

    def alpha_for(self, path: str) -> float:
        """The alpha of the layer at ``path`` (``alpha_pattern``, else ``alpha``)."""
        key = pattern_key(self.alpha_pattern, path)
        return self.alpha if key is None else dict(self.alpha_pattern)[key]

    def scale_for(self, path: str) -> float:
        """The scale of the layer at ``path``: ``alpha_for(path) / rank_for(path)`` (or over
        ``sqrt(rank_for(path))`` with ``rslora``)."""
        return self._scale(self.alpha_for(path), self.rank_for(path))

    def for_path(self, path: str) -> LoraConfig:
        """This config with ``rank`` and ``alpha`` of the layer at ``path`` (no patterns): what
        creates that layer's factors (``init="gaussian"`` uses its rank)."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        return dataclasses.replace(
            self,
            rank=self.rank_for(path),
            alpha=self.alpha_for(path),
            rank_pattern=(),
            alpha_pattern=(),
        )

    def check_patterns(self, paths: Sequence[str]) -> None:
        """Raise if a ``rank_pattern`` / ``alpha_pattern`` key matches none of the adapted
        ``paths`` (a typo would otherwise silently train at the default rank)."""
        for field in ("rank_pattern", "alpha_pattern"):
            for pattern, _ in getattr(self, field):
                if not any(pattern_key(((pattern, None),), p) for p in paths):
                    listing = "\n".join(f"  {p}" for p in list(paths)[:50])
                    raise ValueError(
                        f"`{field}` key {pattern!r} matches no adapted layer (a key matches a "
                        "factor path in the `lora` tree fully or as a '/'-separated suffix, "
                        f"as PEFT does). Adapted paths:\n{listing}"
                    )
