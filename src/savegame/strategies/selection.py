"""Which checkpoint to resume from: an ordered list of candidates, the preferred first.

The caller verifies them in order and takes the first valid one, so a damaged checkpoint falls
back to the one before it.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence, TypeVar

from savegame.strategies.metrics import HasMetrics, Mode, rank_by_metric

ResumeChoice = Literal["latest", "best", "none"]
RESUME_CHOICES = ("latest", "best", "none")
T = TypeVar("T", bound=HasMetrics)


def resume_candidates(checkpoints: Sequence[T], choice: str, metric: Optional[str] = None,
                      mode: Mode = "max") -> list[T]:
    """Candidates in preference order: latest first, or best first (then the rest, newest first)."""
    newest_first = sorted(checkpoints, key=lambda c: c.step, reverse=True)
    if choice == "none":
        return []
    if choice == "latest":
        return newest_first
    if choice == "best":
        if metric is None:
            raise ValueError("resume 'best' needs a monitored metric")
        ranked = rank_by_metric(checkpoints, metric, mode)
        chosen = {c.step for c in ranked}
        return ranked + [c for c in newest_first if c.step not in chosen]
    raise ValueError(f"resume must be one of {RESUME_CHOICES}, not {choice!r}")
