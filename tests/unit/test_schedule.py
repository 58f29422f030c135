"""Save schedules, driven by a fake clock: every n steps / epochs / seconds, on improvement, combined."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.strategies import (AnySchedule, EveryNEpochs, EveryNSeconds, EveryNSteps, History, Moment,
                                 OnImprovement, next_history)

pytestmark = pytest.mark.unit


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def drive(schedule, moments, *, metric=None, mode="max", min_delta=0.0, start=0.0):
    """Run a schedule over boundaries like the worker does; return (step, reason) of each save."""
    history = History(last_time=start)
    saves = []
    for moment in moments:
        reason = schedule.due(moment, history)
        if reason:
            saves.append((moment.step, reason))
        history = next_history(history, moment, bool(reason), metric, mode, min_delta)
    return saves


def steps(n, *, per_epoch=None, dt=1.0, metrics=None):
    """n step boundaries one `dt` apart; epoch ends every `per_epoch` steps."""
    out = []
    for s in range(1, n + 1):
        end = bool(per_epoch) and s % per_epoch == 0
        out.append(Moment(step=s, epoch=s // per_epoch if per_epoch else 0, now=s * dt, at_epoch_end=end,
                          metrics=(metrics or {}).get(s, {})))
    return out


@pytest.mark.parametrize("n, total, expected", [
    (3, 10, [3, 6, 9]),
    (1, 4, [1, 2, 3, 4]),
    (5, 4, []),
    (0, 10, []),
    (-2, 10, []),
])
def test_every_n_steps(n, total, expected):
    assert drive(EveryNSteps(n), steps(total)) == [(s, "periodic") for s in expected]


def test_every_n_steps_not_twice_at_the_same_step_nor_at_step_zero():
    history = History(last_step=6)
    assert EveryNSteps(3).due(Moment(6, 0, 0.0), history) is None
    assert EveryNSteps(3).due(Moment(0, 0, 0.0), History()) is None
    assert EveryNSteps(3).due(Moment(9, 0, 0.0), history) == "periodic"


@pytest.mark.parametrize("n, per_epoch, total, expected", [
    (1, 4, 12, [4, 8, 12]),
    (2, 4, 17, [8, 16]),
    (3, 2, 12, [6, 12]),
    (0, 4, 12, []),
])
def test_every_n_epochs_at_epoch_ends_only(n, per_epoch, total, expected):
    assert drive(EveryNEpochs(n), steps(total, per_epoch=per_epoch)) == [(s, "periodic") for s in expected]


def test_every_n_epochs_ignores_mid_epoch_boundaries():
    assert EveryNEpochs(1).due(Moment(5, 1, 0.0, at_epoch_end=False), History()) is None
    assert EveryNEpochs(1).due(Moment(5, 0, 0.0, at_epoch_end=True), History()) is None  # epoch 0: none done


def test_every_n_seconds_with_a_fake_clock():
    clock = FakeClock()
    schedule = EveryNSeconds(60)
    history = History(last_time=clock.now)  # the start time, before the first save
    saves = []
    for step in range(1, 200):
        moment = Moment(step, 0, clock.advance(7.0))
        reason = schedule.due(moment, history)
        if reason:
            saves.append(round(moment.now - 1000.0))
        history = next_history(history, moment, bool(reason), None, "max")
    assert saves[:4] == [63, 126, 189, 252]  # the first boundary at or after 60 s since the last save
    assert all(b - a == 63 for a, b in zip(saves, saves[1:]))


@pytest.mark.parametrize("seconds, last_time, now, expected", [
    (60, 0.0, 59.999, None),
    (60, 0.0, 60.0, "periodic"),
    (60, 100.0, 161.0, "periodic"),
    (60, None, 10_000.0, None),  # no start time known: never due
    (0, 0.0, 10_000.0, None),  # off
])
def test_every_n_seconds_edges(seconds, last_time, now, expected):
    assert EveryNSeconds(seconds).due(Moment(1, 0, now), History(last_time=last_time)) == expected


def test_every_n_seconds_uses_the_time_of_the_last_save_not_of_the_last_boundary():
    history = History(last_time=0.0)
    moment = Moment(1, 0, 50.0)
    history = next_history(history, moment, False, None, "max")
    assert history.last_time == 0.0
    assert EveryNSeconds(60).due(Moment(2, 0, 61.0), history) == "periodic"


@pytest.mark.parametrize("mode, min_delta, values, expected_saves", [
    ("max", 0.0, [0.5, 0.6, 0.55, 0.7, 0.7], [1, 2, 4]),
    ("min", 0.0, [0.5, 0.6, 0.4, 0.4, 0.1], [1, 3, 5]),
    ("max", 0.05, [0.5, 0.54, 0.56, 0.6, 0.61], [1, 3]),
    ("min", 0.1, [1.0, 0.95, 0.85, 0.8, 0.7], [1, 3, 5]),
    # a slow, steady improvement is saved once it adds up to more than min_delta
    ("max", 0.1, [0.50, 0.55, 0.60, 0.65, 0.70, 0.75, 0.80], [1, 4, 7]),
])
def test_on_improvement_with_min_delta(mode, min_delta, values, expected_saves):
    metrics = {i + 1: {"val": v} for i, v in enumerate(values)}
    saves = drive(OnImprovement("val", mode, min_delta), steps(len(values), metrics=metrics),
                  metric="val", mode=mode, min_delta=min_delta)
    assert saves == [(s, "best") for s in expected_saves]


def test_on_improvement_ignores_missing_and_nan_values():
    schedule = OnImprovement("val", "max")
    assert schedule.due(Moment(1, 0, 0.0, metrics={"other": 1.0}), History()) is None
    assert schedule.due(Moment(1, 0, 0.0, metrics={"val": float("nan")}), History(best=0.1)) is None
    assert schedule.due(Moment(1, 0, 0.0, metrics={"val": 0.2}), History(best=float("nan"))) == "best"


def test_combined_schedule_reasons():
    schedule = AnySchedule((EveryNSteps(4), EveryNEpochs(1), OnImprovement("acc", "max")))
    metrics = {3: {"acc": 0.5}, 5: {"acc": 0.4}, 8: {"acc": 0.7}}
    saves = drive(schedule, steps(10, per_epoch=5, metrics=metrics), metric="acc")
    # 3: first value; 4: every 4 steps; 5: epoch end (0.4 is no better); 8: better and every 4 -> best
    assert saves == [(3, "best"), (4, "periodic"), (5, "periodic"), (8, "best"), (10, "periodic")]


def test_combined_schedule_seconds_and_steps():
    schedule = AnySchedule((EveryNSteps(100), EveryNSeconds(30)))
    saves = drive(schedule, steps(250, dt=0.5))
    # every 100 steps, or every 30 s (60 steps) since the last save of either kind
    assert [s for s, _ in saves] == [60, 100, 160, 200]
    assert all(reason == "periodic" for _, reason in saves)


def test_empty_combination_is_never_due():
    assert drive(AnySchedule(()), steps(20, per_epoch=2)) == []


def test_next_history_tracks_the_best_even_when_not_saved():
    history = next_history(History(best=0.5), Moment(1, 0, 0.0, metrics={"acc": 0.7}), False, "acc", "max")
    assert history == History(best=0.7)
    history = next_history(history, Moment(2, 0, 3.0, metrics={"acc": 0.6}), True, "acc", "max")
    assert history == History(last_step=2, last_time=3.0, best=0.7)
    assert next_history(history, Moment(3, 0, 4.0), False, None, "max") == history


@settings(database=None, deadline=None, max_examples=200)
@given(values=st.lists(st.floats(-5, 5), min_size=1, max_size=30), mode=st.sampled_from(["min", "max"]),
       min_delta=st.sampled_from([0.0, 0.01, 0.5]))
def test_improvement_saves_track_the_best_value(values, mode, min_delta):
    """Each 'best' save beats the previous one by more than min_delta, and no value seen since the
    last save beats it by more than min_delta (so the best state is never lost)."""
    metrics = {i + 1: {"v": v} for i, v in enumerate(values)}
    saves = drive(OnImprovement("v", mode, min_delta), steps(len(values), metrics=metrics),
                  metric="v", mode=mode, min_delta=min_delta)
    saved = [values[s - 1] for s, _ in saves]
    sign = 1 if mode == "max" else -1
    assert saves and saves[0][0] == 1
    # compared as is_better does (b beyond a + min_delta), not as b - a: the two round differently at the edge
    assert all(sign * b > sign * a + min_delta for a, b in zip(saved, saved[1:]))
    assert all(sign * v <= sign * saved[-1] + min_delta for v in values[saves[-1][0]:])
