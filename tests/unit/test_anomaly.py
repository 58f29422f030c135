"""Which losses are anomalous (NaN/inf, a spike over the running median), table-driven."""
from __future__ import annotations

import math

import pytest

from savegame.strategies.anomaly import MIN_HISTORY, RollbackRule, check_loss, remember

pytestmark = pytest.mark.unit
BOTH = RollbackRule(on=("nan", "spike"), spike_factor=10.0, window=100, max=3)
FLAT = [1.0] * 20


@pytest.mark.parametrize("rule, loss, recent, kind", [
    (BOTH, math.nan, FLAT, "nan"),
    (BOTH, math.inf, FLAT, "nan"),  # an infinite loss is as poisoned as a NaN
    (BOTH, -math.inf, FLAT, "nan"),
    (BOTH, math.nan, [], "nan"),  # NaN needs no history
    (BOTH, 10.5, FLAT, "spike"),  # > 10 x the median of 1.0
    (BOTH, 10.0, FLAT, None),  # exactly 10 x is not more than 10 x
    (BOTH, 0.5, FLAT, None),
    (BOTH, 50.0, [1.0] * (MIN_HISTORY - 1), None),  # too little history to judge a spike
    (BOTH, 50.0, [1.0] * MIN_HISTORY, "spike"),
    (BOTH, 40.0, [1.0] * 10 + [100.0] * 9, "spike"),  # the median, not the mean: a few outliers do not hide it
    (BOTH, 40.0, [1.0] * 9 + [100.0] * 10, None),  # the median is 100 now
    (BOTH, 5.0, [-1.0] * 20, None),  # no spike rule over a median <= 0 (a log-likelihood loss)
    (RollbackRule(on=("nan",)), 1e9, FLAT, None),  # spikes not asked for
    (RollbackRule(on=("spike",)), math.nan, FLAT, None),  # NaN not asked for
    (RollbackRule(on=("spike",), spike_factor=2.0), 2.5, FLAT, "spike"),
    (RollbackRule(on=()), math.nan, FLAT, None),  # off
])
def test_check_loss(rule, loss, recent, kind):
    anomaly = check_loss(loss, recent, rule)
    assert (anomaly.kind if anomaly else None) == kind
    if anomaly is not None:
        assert anomaly.loss == loss or math.isnan(loss)


def test_the_anomaly_says_why():
    assert "running median 1" in check_loss(20.0, FLAT, BOTH).why and "10" in check_loss(20.0, FLAT, BOTH).why
    assert "not finite" in check_loss(math.nan, FLAT, BOTH).why


def test_only_the_last_window_counts():
    rule = RollbackRule(on=("spike",), window=20)
    recent: tuple = ()
    for _ in range(100):
        recent = remember(recent, 100.0, rule.window)
    for _ in range(20):
        recent = remember(recent, 1.0, rule.window)
    assert len(recent) == 20 and check_loss(50.0, recent, rule).kind == "spike"


def test_anomalous_and_non_finite_losses_are_never_remembered():
    recent = remember((), 1.0, 5)
    assert remember(recent, math.nan, 5) == recent
    assert remember(recent, math.inf, 5) == recent


@pytest.mark.parametrize("kwargs, message", [
    ({"on": ("nan", "explode")}, "nan, spike"),
    ({"spike_factor": 1.0}, "more than 1"),
    ({"window": 0}, ">= 1"),
    ({"max": -1}, ">= 0"),
])
def test_a_bad_rule_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RollbackRule(**kwargs)
