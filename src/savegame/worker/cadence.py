"""`every_seconds = "auto"` in the worker: measure what saves cost, work out the Young-Daly interval
(strategies/interval.py), and say so whenever it changes.

The stall is the time the training thread spends in a save (the capture and the copy); the persist
time runs from handing the save to the writer to its commit. Emergency and final saves wait for the
disk on purpose and are not measured. The run's failures and observed time come from the daemon
(SAVEGAME_RELIABILITY, read once at start) plus the time this worker has run; on its own a worker
knows none and uses the prior. The smoothed costs are saved in each checkpoint, so a resumed worker
starts from them instead of measuring again.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Optional

from savegame import protocol
from savegame.strategies.interval import Interval, Reliability, SaveCost, auto_interval, smooth, worth_announcing

log = logging.getLogger("savegame.worker")


class AutoCadence:
    def __init__(self, prior_s: float, announce: Callable[[Interval], None]) -> None:
        self.prior_s = prior_s
        self.cost: Optional[SaveCost] = None
        self.interval: Optional[Interval] = None
        self._announce = announce
        self._started = time.monotonic()
        self._seen = _reliability_from_env()

    def measured(self, stall_s: float, persist_s: Optional[float]) -> Optional[float]:
        """One save's costs (persist: of the last save that committed, if known). The new interval in
        seconds when it moved enough to change the schedule, else None."""
        persist = persist_s if persist_s is not None else (self.cost.persist_s if self.cost else 0.0)
        self.cost = smooth(self.cost, SaveCost(stall_s, persist))
        return self.update()

    def update(self) -> Optional[float]:
        seen = Reliability(self._seen.failures, self._seen.observed_s + time.monotonic() - self._started)
        interval = auto_interval(self.cost, self.prior_s, seen)
        if not worth_announcing(self.interval, interval):
            return None
        self.interval = interval
        self._announce(interval)
        return interval.seconds

    def state(self) -> Optional[dict[str, float]]:
        return None if self.cost is None else {"stall_s": self.cost.stall_s, "persist_s": self.cost.persist_s}

    def load(self, saved: Any) -> None:
        if isinstance(saved, dict) and all(_seconds(saved.get(k)) for k in ("stall_s", "persist_s")):
            self.cost = SaveCost(float(saved["stall_s"]), float(saved["persist_s"]))


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < math.inf


def _reliability_from_env() -> Reliability:
    text = os.environ.get(protocol.ENV_RELIABILITY, "")
    try:
        return Reliability.parse(text)
    except ValueError as exc:
        log.warning("ignoring %s=%r (%s): the MTBF starts from the prior", protocol.ENV_RELIABILITY, text[:200], exc)
        return Reliability(0, 0.0)
