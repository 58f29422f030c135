"""Comparing monitored metrics: which direction is better, and by how much."""
from __future__ import annotations

import math
from typing import Callable, Iterable, Literal, Mapping, Optional, Protocol, TypeVar

Mode = Literal["min", "max"]
MODES = ("min", "max", "auto")
_MAX_HINTS = ("acc", "auc", "f1", "precision", "recall", "iou", "dice", "bleu", "rouge", "map", "score")


def resolve_mode(mode: str, metric: str) -> Mode:
    """'auto' picks max for accuracy-like names (like Keras' ModelCheckpoint), min otherwise."""
    if mode in ("min", "max"):
        return mode  # type: ignore[return-value]
    if mode != "auto":
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    name = metric.lower()
    return "max" if any(hint in name for hint in _MAX_HINTS) else "min"


def _finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def is_better(value: float, reference: Optional[float], mode: Mode, min_delta: float = 0.0) -> bool:
    """Whether `value` improves on `reference` by more than `min_delta` (any finite value beats None).

    Non-finite values (NaN, +-inf: a diverged loss) are never better, and a non-finite reference
    is no reference: a -inf loss must not become a best that nothing can beat."""
    if not _finite(value):
        return False
    if not _finite(reference):
        return True
    if mode == "max":
        return value > reference + abs(min_delta)
    return value < reference - abs(min_delta)


class HasMetrics(Protocol):
    @property
    def step(self) -> int: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


T = TypeVar("T", bound=HasMetrics)


def metric_of(item: HasMetrics, metric: str) -> Optional[float]:
    """The item's finite value of `metric`, or None (missing, NaN or infinite: never ranked)."""
    value = item.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def rank_by_metric(items: Iterable[T], metric: str, mode: Mode) -> list[T]:
    """Items holding the metric, best first; ties go to the newer step. Items without it are left out."""
    scored = [(metric_of(i, metric), i) for i in items]
    sign = -1.0 if mode == "max" else 1.0
    key: Callable[[tuple[Optional[float], T]], tuple[float, int]] = lambda p: (sign * p[0], -p[1].step)  # type: ignore[operator]  # noqa: E731
    return [item for value, item in sorted((p for p in scored if p[0] is not None), key=key)]
