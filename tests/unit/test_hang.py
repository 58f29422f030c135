"""Hang detection's policy: the timeout follows the slowest step seen, never below a floor, only grows,
in steps of at least 10% (so the log shows a few changes, not one per step)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from savegame.strategies.hang import (DEFAULT_FLOOR_S, FACTOR, auto_hang_timeout, slowest_step_at_least)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("current, slowest, floor, expected", [
    (0.0, 0.0, 1800.0, 1800.0),          # nothing seen yet: the floor
    (1800.0, 0.05, 1800.0, 1800.0),      # fast steps: 20 x 0.05 s is far below 30 min
    (1800.0, 90.0, 1800.0, 1800.0),      # exactly at the floor: no change
    (1800.0, 120.0, 1800.0, 2400.0),     # 20 x 2 min
    (2400.0, 121.0, 1800.0, 2640.0),     # a little slower: at least 10% more, never less than 20x
    (2400.0, 200.0, 1800.0, 4000.0),     # much slower: 20x
    (4000.0, 10.0, 1800.0, 4000.0),      # never shrinks: a slow step may come again
    (0.0, 0.2, 1.5, 4.0),                # a small floor (tests): 20 x 0.2 s
    (3.0, 0.0, 1.5, 3.0),
])
def test_auto_hang_timeout(current, slowest, floor, expected):
    assert auto_hang_timeout(current, slowest, floor) == pytest.approx(expected)


def test_the_default_floor_is_30_minutes_and_the_factor_20():
    assert DEFAULT_FLOOR_S == 1800.0 and FACTOR == 20.0
    assert auto_hang_timeout(0.0, 0.0) == 1800.0
    assert auto_hang_timeout(1800.0, 100.0) == 2000.0


@given(current=st.floats(0, 1e6), slowest=st.floats(0, 1e5), floor=st.floats(0.1, 1e4))
def test_never_below_20_times_the_slowest_step_nor_the_floor_and_never_shrinks(current, slowest, floor):
    timeout = auto_hang_timeout(current, slowest, floor)
    assert timeout >= current and timeout >= floor and timeout >= FACTOR * slowest
    assert timeout == current or timeout >= 1.1 * current  # changes are jumps worth a log line


@pytest.mark.parametrize("gap, steps, interval, expected", [
    (0.5, 50, 0.5, 0.01),     # fast steps, one heartbeat per 0.5 s: the mean
    (0.8, 2, 0.5, 0.4),       # 0.4 s steps: a heartbeat every second step
    (0.6, 1, 0.5, 0.6),       # one step between heartbeats: its whole duration
    (60.5, 6, 0.5, 60.0),     # five quick steps, then a 60 s one: the last took at least gap - interval
    (3.0, 0, 0.5, 0.0),       # no step made (a keepalive during an evaluation): not a step time
    (-1.0, 3, 0.5, 0.0),      # a clock that went back: nothing learned
])
def test_slowest_step_between_two_heartbeats(gap, steps, interval, expected):
    assert slowest_step_at_least(gap, steps, interval) == pytest.approx(expected)


def watch_events(floor: float, events: list[tuple[int, float, float]]):
    """A HangWatch fed heartbeats (step, the worker's clock, the daemon's monotonic receipt time)."""
    from savegame.daemon.hang import HangWatch

    watch = HangWatch("auto", floor)
    for step, when, received in events:
        watch.observe({"event": "heartbeat", "step": step, "time": when}, received)
    return watch


def test_a_slow_step_raises_the_timeout_and_a_keepalive_is_not_a_step():
    watch = watch_events(1.0, [(0, 1000.0, 5.0), (1, 1000.6, 5.6), (1, 1010.0, 15.0), (2, 1010.1, 15.1)])
    assert watch.slowest_step_s == pytest.approx(0.6) and watch.timeout_s == pytest.approx(12.0)


def test_a_jump_of_the_workers_clock_is_not_a_slow_step():
    """The worker's wall clock jumps an hour ahead between two heartbeats half a second apart: the
    daemon's own monotonic clock bounds the gap (else the timeout would grow to 20 hours)."""
    watch = watch_events(1.0, [(0, 1000.0, 5.0), (1, 4600.5, 5.5)])
    assert watch.timeout_s < 200.0
    assert watch_events(1.0, [(0, 1000.0, 5.0), (1, 990.0, 5.5)]).timeout_s == 1.0  # a jump back: nothing learned
