"""Which training losses are anomalous: not finite (NaN, inf), or a spike. Pure: losses in, a verdict out.

A spike is a loss above `spike_factor` times the running median of the last `window` normal losses
(the median, so a few noisy batches do not move the reference; like Megatron's spiky-loss check).
It is judged only once MIN_HISTORY losses are known, and only over a positive median: a loss that
may be negative (a log-likelihood) has no meaningful "ten times larger".
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

KINDS = ("nan", "spike")
MIN_HISTORY = 10


@dataclass(frozen=True)
class RollbackRule:
    on: tuple[str, ...] = ()  # empty: rollback is off
    spike_factor: float = 10.0
    window: int = 100
    max: int = 3  # rollbacks per run; one more anomaly gives up
    skip_batches: bool = False  # after rolling back, step over the batch that produced the anomaly

    def __post_init__(self) -> None:
        if any(kind not in KINDS for kind in self.on):
            raise ValueError(f"on: each must be one of {', '.join(KINDS)}")
        if not self.spike_factor > 1.0 or math.isinf(self.spike_factor):
            raise ValueError("spike_factor must be a finite number more than 1")
        if self.window < 1:
            raise ValueError("window must be an integer >= 1")
        if self.max < 0:
            raise ValueError("max must be an integer >= 0")

    @property
    def enabled(self) -> bool:
        return bool(self.on)


@dataclass(frozen=True)
class Anomaly:
    kind: str  # "nan" or "spike"
    loss: float
    why: str


def check_loss(loss: float, recent: Sequence[float], rule: RollbackRule) -> Optional[Anomaly]:
    """The anomaly this loss is, given the recent normal losses (oldest first), or None."""
    if not math.isfinite(loss):
        return Anomaly("nan", loss, f"the loss is not finite ({loss})") if "nan" in rule.on else None
    if "spike" not in rule.on or len(recent) < min(MIN_HISTORY, rule.window):
        return None
    median = statistics.median(recent[-rule.window:])
    if median > 0 and loss > rule.spike_factor * median:
        return Anomaly("spike", loss, f"the loss {loss:.4g} is more than {rule.spike_factor:g} x the running "
                                      f"median {median:.4g} of the last {min(len(recent), rule.window)} losses")
    return None


def remember(recent: Sequence[float], loss: float, window: int) -> tuple[float, ...]:
    """The window after a normal loss (a non-finite one is never a reference)."""
    if not math.isfinite(loss):
        return tuple(recent)
    return (*recent, float(loss))[-window:]
