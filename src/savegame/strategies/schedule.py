"""Save schedules: when to write a checkpoint. Pure: the caller passes the moment and the history."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol

from savegame.strategies.metrics import Mode, is_better


@dataclass(frozen=True)
class Moment:
    """A step or epoch boundary. `epoch` counts completed epochs; `step` completed steps."""

    step: int
    epoch: int
    now: float  # time.monotonic() of the caller
    at_epoch_end: bool = False
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class History:
    """What a schedule remembers: the last save and the best monitored value seen so far."""

    last_step: Optional[int] = None
    last_time: Optional[float] = None  # monotonic; set to the start time before the first save
    best: Optional[float] = None


class Schedule(Protocol):
    def due(self, moment: Moment, history: History) -> Optional[str]:
        """The reason to save now ("periodic" or "best"), or None."""
        ...


@dataclass(frozen=True)
class EveryNSteps:
    n: int

    def due(self, moment: Moment, history: History) -> Optional[str]:
        if self.n > 0 and moment.step > 0 and moment.step % self.n == 0 and moment.step != history.last_step:
            return "periodic"
        return None


@dataclass(frozen=True)
class EveryNEpochs:
    n: int

    def due(self, moment: Moment, history: History) -> Optional[str]:
        if self.n > 0 and moment.at_epoch_end and moment.epoch > 0 and moment.epoch % self.n == 0:
            return "periodic"
        return None


@dataclass(frozen=True)
class EveryNSeconds:
    seconds: float

    def due(self, moment: Moment, history: History) -> Optional[str]:
        if self.seconds <= 0 or history.last_time is None:
            return None
        return "periodic" if moment.now - history.last_time >= self.seconds else None


@dataclass(frozen=True)
class OnImprovement:
    """Save when the monitored metric beats the best so far by more than min_delta."""

    metric: str
    mode: Mode
    min_delta: float = 0.0

    def due(self, moment: Moment, history: History) -> Optional[str]:
        value = moment.metrics.get(self.metric)
        if value is not None and is_better(value, history.best, self.mode, self.min_delta):
            return "best"
        return None


@dataclass(frozen=True)
class AnySchedule:
    """Due when any part is due; an improvement wins as the reason (it says more)."""

    parts: tuple[Schedule, ...]

    def due(self, moment: Moment, history: History) -> Optional[str]:
        reasons = [r for r in (p.due(moment, history) for p in self.parts) if r]
        if not reasons:
            return None
        return "best" if "best" in reasons else reasons[0]


def next_history(history: History, moment: Moment, saved: bool, metric: Optional[str], mode: Mode,
                 min_delta: float = 0.0) -> History:
    """The history after a boundary: a new best is remembered whether or not it was saved.

    A new best must beat the old one by more than `min_delta`, as in OnImprovement: with 0 here,
    small gains would creep the reference up and a slow, steady improvement would never be saved.
    """
    best = history.best
    if metric is not None:
        value = moment.metrics.get(metric)
        if value is not None and is_better(value, best, mode, min_delta):
            best = value
    if saved:
        return History(last_step=moment.step, last_time=moment.now, best=best)
    return History(last_step=history.last_step, last_time=history.last_time, best=best)
