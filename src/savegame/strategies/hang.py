"""When a silent worker counts as hung: a timeout that follows the run's slowest step. Pure.

`hang_timeout = "auto"` is max(floor, 20 x the slowest step seen so far): a run whose steps take a
second is declared hung after 30 minutes of silence, one whose steps take 3 minutes after an hour.
It only grows (a slow step may come again), and in jumps of at least 10%, so the log shows a few
changes rather than one per step. A long evaluation announced with `ckpt.keepalive(...)` sends
heartbeats without advancing the step, so it neither looks like a hang nor counts as a step.
"""
from __future__ import annotations

DEFAULT_FLOOR_S = 1800.0
FACTOR = 20.0
MIN_GROWTH = 1.1


def auto_hang_timeout(current: float, slowest_step_s: float, floor_s: float = DEFAULT_FLOOR_S,
                      factor: float = FACTOR) -> float:
    """The timeout after a step of `slowest_step_s` (the slowest so far); `current` is the one in
    effect (0 before the first)."""
    wanted = max(floor_s, factor * slowest_step_s)
    if wanted <= current:
        return current
    return max(wanted, current * MIN_GROWTH)


def slowest_step_at_least(gap_s: float, steps: int, heartbeat_interval_s: float) -> float:
    """A lower bound on the slowest of `steps` steps done in the `gap_s` seconds between two events.

    The mean is one. And the worker sends a heartbeat at the first step boundary at least
    `heartbeat_interval_s` after its previous one, so every step of the gap but the last ended within
    that interval: the last one took at least gap - interval (one slow step among many quick ones
    is seen whole, not averaged away)."""
    if steps <= 0 or gap_s <= 0:
        return 0.0
    return max(gap_s / steps, gap_s - heartbeat_interval_s)
