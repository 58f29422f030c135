"""The worker's loss guard: reported losses are checked against the `[rollback]` rule; a bad one is
remembered with the step and the data position it came from, and the Checkpointer rolls back.

The window of recent losses is saved in every checkpoint, so a resumed run judges spikes exactly as
an uninterrupted one would. The batches to skip come from the run's anomaly record.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Optional

from savegame.anomalies import AnomalyEntry, finite_or_none
from savegame.strategies.anomaly import Anomaly, RollbackRule, check_loss, remember


@dataclass(frozen=True)
class Pending:
    anomaly: Anomaly
    step: int  # the state the loss was measured on: checkpoints from it on are suspect
    epoch: int
    batch: int  # the batch's position in its epoch

    def entry(self, skip: bool) -> AnomalyEntry:
        return AnomalyEntry(self.step, self.epoch, self.batch, self.anomaly.kind, finite_or_none(self.anomaly.loss),
                            skip, time.time())


class LossGuard:
    def __init__(self, rule: RollbackRule, skip: frozenset[tuple[int, int]] = frozenset()) -> None:
        self.rule = rule
        self.skip = skip
        self.window: tuple[float, ...] = ()
        self.pending: Optional[Pending] = None  # the first bad loss since the last rollback
        self.last_loss: Optional[float] = None

    def report(self, loss: Any, step: int, epoch: int, batch: int) -> None:
        """The loss of the batch at (epoch, batch), trained on the state after `step` steps."""
        value = float(loss)  # a tensor, a NumPy scalar, a float
        self.last_loss = value
        if self.pending is not None:
            return  # already going back: later losses say nothing new
        anomaly = check_loss(value, self.window, self.rule) if self.rule.enabled else None
        if anomaly is not None:
            self.pending = Pending(anomaly, step, epoch, batch)
        elif math.isfinite(value):
            self.window = remember(self.window, value, self.rule.window)

    def skips(self, epoch: int, batch: int) -> bool:
        return (epoch, batch) in self.skip

    def state(self) -> list[float]:
        return list(self.window)

    def load(self, losses: Any) -> None:
        if isinstance(losses, list):
            self.window = tuple(float(v) for v in losses if isinstance(v, (int, float)) and math.isfinite(v))[
                -self.rule.window:]
