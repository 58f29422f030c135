"""Hang detection's mechanism: the timeout in effect, learned from the worker's heartbeats.

`hang_timeout` is a number of seconds (0: off) or "auto": strategies/hang.py turns the slowest step
seen into the timeout. Step times come from the worker's own clock (each event's `time`: when it
was sent, not when the daemon got to it), between consecutive heartbeat events whose step advanced,
bounded by the daemon's monotonic clock (a wall clock that jumps is not a slow step); a keepalive
heartbeat (same step) is a fresh reference, not a step. A new worker starts a new reference: its
start-up is not a step.

"auto" arms once the current worker has sent its first event: a script that loads its data for an
hour before it creates its Checkpointer must not be killed (and restarted into the same wait) again
and again. A number applies from the spawn on, as it always did.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional

from savegame.protocol import HEARTBEAT_INTERVAL_S
from savegame.strategies.hang import auto_hang_timeout, slowest_step_at_least

log = logging.getLogger("savegame")
STEP_EVENTS = ("heartbeat", "started", "resumed")  # sent by the training thread at a step boundary
CLOCK_SLACK_S = 5.0  # how far the worker's gap may exceed the daemon's (events queued while it was busy)


class HangWatch:
    def __init__(self, setting: Any, floor_s: float) -> None:
        self.auto = setting == "auto"
        self.floor_s = floor_s
        self.slowest_step_s = 0.0
        self.timeout_s = auto_hang_timeout(0.0, 0.0, floor_s) if self.auto else float(setting)
        self._last: Optional[tuple[int, float, float]] = None  # (step, worker time, receipt) of the latest
        self._heard = False  # the current worker has sent an event
        if self.auto:
            log.info("hang timeout: auto, %s for now (the larger of hang_floor and 20 x the slowest step)",
                     _seconds(self.timeout_s))
        elif not self.timeout_s:
            log.info("hang timeout: off")

    @property
    def limit_s(self) -> float:
        """The silence after which the current worker counts as hung (0: not now)."""
        return self.timeout_s if self._heard or not self.auto else 0.0

    def new_worker(self) -> None:
        self._last, self._heard = None, False

    def observe(self, event: Mapping[str, Any], received: float) -> None:
        """A worker event, received at `received` (monotonic): a step time learned, and the timeout
        raised when `auto` says so."""
        self._heard = True
        step, when = event.get("step"), event.get("time")
        if event.get("event") not in STEP_EVENTS or not _is_number(step) or not _is_number(when):
            return
        last, self._last = self._last, (int(step), float(when), received)
        if last is None or step <= last[0]:
            return
        gap = min(float(when) - last[1], received - last[2] + CLOCK_SLACK_S)
        bound = slowest_step_at_least(gap, int(step) - last[0], HEARTBEAT_INTERVAL_S)
        if bound <= self.slowest_step_s:
            return
        self.slowest_step_s = bound
        if self.auto:
            timeout = auto_hang_timeout(self.timeout_s, bound, self.floor_s)
            if timeout != self.timeout_s:
                self.timeout_s = timeout
                log.info("hang timeout now %s: 20 x the slowest step so far (%.3gs, up to step %d)",
                         _seconds(timeout), bound, int(step))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _seconds(value: float) -> str:
    return f"{value / 60:.3g}m" if value >= 120 else f"{value:.3g}s"
