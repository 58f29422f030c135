"""Restart decisions: backoff growth and cap, the budget per window, preemptions, same-step fallback."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.strategies.restart import PREEMPTION_WINDOW_S
from savegame.strategies import Decision, Failure, RestartPolicy, decide

pytestmark = pytest.mark.unit

POLICY = RestartPolicy(max_restarts=5, window_s=3600.0, backoff_initial_s=1.0, backoff_max_s=60.0,
                       backoff_factor=2.0, same_step_limit=3)


def crashes(times, steps=None, cause="crash"):
    steps = steps if steps is not None else range(100, 100 * (len(times) + 1), 100)  # progress each time
    return [Failure(t, cause, s) for t, s in zip(times, steps)]


@pytest.mark.parametrize("count, expected_delay", [
    (1, 0.0),  # a one-off crash costs no time
    (2, 1.0),
    (3, 2.0),
    (4, 4.0),
    (5, 8.0),
])
def test_backoff_grows_exponentially(count, expected_delay):
    decision = decide(POLICY, crashes([float(i) for i in range(count)]), now=float(count), fell_back=False)
    assert decision.action == "restart"
    assert decision.delay_s == expected_delay


@pytest.mark.parametrize("count, expected_delay", [(2, 10.0), (3, 30.0), (4, 45.0), (8, 45.0), (20, 45.0)])
def test_backoff_is_capped(count, expected_delay):
    policy = RestartPolicy(max_restarts=100, backoff_initial_s=10.0, backoff_max_s=45.0, backoff_factor=3.0)
    decision = decide(policy, crashes([float(i) for i in range(count)]), now=float(count), fell_back=False)
    assert (decision.action, decision.delay_s) == ("restart", expected_delay)


@pytest.mark.parametrize("cause", ["crash", "killed", "hang", "bad-checkpoint"])
def test_budget_per_window_gives_up(cause):
    failures = crashes([10.0 * i for i in range(6)], cause=cause)
    assert decide(POLICY, failures[:5], now=60.0, fell_back=False).action == "restart"
    decision = decide(POLICY, failures, now=60.0, fell_back=False)
    assert decision.action == "give-up"
    assert "6 failures" in decision.reason and "budget is 5" in decision.reason and cause in decision.reason


def test_old_failures_leave_the_window():
    failures = crashes([0.0, 1.0, 2.0, 3.0, 150.0, 3700.0])
    decision = decide(POLICY, failures, now=3700.0, fell_back=False)
    assert decision.action == "restart"
    assert decision.delay_s == 1.0  # two failures in the last hour: at 150 s and at 3700 s
    assert "2 of 5" in decision.reason
    assert decide(POLICY, failures[:5], now=4.0, fell_back=False).delay_s == 8.0


def test_zero_restarts_gives_up_at_the_first_failure():
    policy = RestartPolicy(max_restarts=0)
    assert decide(policy, crashes([1.0]), now=1.0, fell_back=False).action == "give-up"


def test_preemption_restarts_at_once_and_is_not_counted():
    failures = crashes([float(i) for i in range(5)]) + [Failure(5.0, "preempted", 600)]
    decision = decide(POLICY, failures, now=5.0, fell_back=False)
    assert decision == Decision("restart", 0.0, decision.reason) and "preempted" in decision.reason
    # many preemptions never exhaust the budget, nor count as failures at the same step; quick ones back off
    many = [Failure(float(i), "preempted", 100) for i in range(50)]
    decision = decide(POLICY, many, now=50.0, fell_back=False)
    assert decision.action == "restart" and decision.delay_s == POLICY.backoff_max_s and "backing off" in decision.reason
    after = many + [Failure(51.0, "crash", 100)]
    decision = decide(POLICY, after, now=51.0, fell_back=False)
    assert (decision.action, decision.delay_s) == ("restart", 0.0)
    assert "1 of 5" in decision.reason


def test_same_step_falls_back_once_then_gives_up():
    failures = crashes([1.0, 2.0], steps=[700, 700])
    assert decide(POLICY, failures, now=2.0, fell_back=False).action == "restart"
    failures = crashes([1.0, 2.0, 3.0], steps=[700, 700, 700])
    decision = decide(POLICY, failures, now=3.0, fell_back=False)
    assert decision.action == "fallback"
    assert "step 700" in decision.reason and decision.delay_s == 2.0
    decision = decide(POLICY, failures, now=3.0, fell_back=True)
    assert decision.action == "give-up" and "step 700" in decision.reason


@pytest.mark.parametrize("steps, action", [
    ([700, 800, 700], "restart"),  # progress in between: not stuck
    ([700, 700, 800], "restart"),
    ([None, None, None], "restart"),  # unknown step: cannot say it is the same
    ([5, 5, 5], "fallback"),
])
def test_same_step_needs_consecutive_failures_at_one_known_step(steps, action):
    assert decide(POLICY, crashes([1.0, 2.0, 3.0], steps=steps), now=3.0, fell_back=False).action == action


def test_preemptions_between_same_step_failures_do_not_hide_them():
    failures = [Failure(1.0, "crash", 700), Failure(2.0, "preempted", 700), Failure(3.0, "crash", 700),
                Failure(4.0, "hang", 700)]
    assert decide(POLICY, failures, now=4.0, fell_back=False).action == "fallback"


def test_budget_wins_over_fallback():
    failures = crashes([float(i) for i in range(6)], steps=[700] * 6)
    assert decide(POLICY, failures, now=6.0, fell_back=False).action == "give-up"


@settings(database=None, deadline=None, max_examples=300)
@given(events=st.lists(st.tuples(st.floats(0, 100), st.sampled_from(["crash", "killed", "hang", "preempted"]),
                                 st.one_of(st.none(), st.integers(0, 3))), min_size=1, max_size=30),
       fell_back=st.booleans())
def test_decisions_are_always_within_bounds(events, fell_back):
    t, failures = 0.0, []
    for gap, cause, step in events:
        t += gap
        failures.append(Failure(t, cause, step))
    decision = decide(POLICY, failures, now=t, fell_back=fell_back)
    assert decision.action in ("restart", "fallback", "give-up")
    assert 0.0 <= decision.delay_s <= POLICY.backoff_max_s
    assert decision.reason
    counted = [f for f in failures if f.cause != "preempted" and t - f.time <= POLICY.window_s]
    quick = [f for f in failures if f.cause == "preempted" and t - f.time <= PREEMPTION_WINDOW_S]
    if failures[-1].cause == "preempted":
        assert decision.action == "restart" and (decision.delay_s == 0.0) == (len(quick) == 1)
    elif len(counted) > POLICY.max_restarts:
        assert decision.action == "give-up"
    if decision.action == "fallback":
        assert not fell_back
