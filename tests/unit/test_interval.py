"""The adaptive save interval (Young-Daly), table-driven: costs and failure counts in, seconds out."""
from __future__ import annotations

import math

import pytest

from savegame.strategies.interval import (BOOTSTRAP_S, MIN_INTERVAL_S, Interval, Reliability, SaveCost,
                                          auto_interval, estimate_mtbf, smooth, worth_announcing, young_daly)

pytestmark = pytest.mark.unit
DAY = 86400.0


@pytest.mark.parametrize("cost, mtbf, expected", [
    (1.0, 2.0, 2.0),  # sqrt(2 * 1 * 2)
    (0.15, DAY, math.sqrt(2 * 0.15 * DAY)),  # 161 s: a 1 GiB state's stall, a failure a day
    (5.0, 3600.0, 189.7366596),  # a synchronous save, a failure an hour
    (0.0, DAY, 0.0),
])
def test_young_daly(cost, mtbf, expected):
    assert young_daly(cost, mtbf) == pytest.approx(expected)


@pytest.mark.parametrize("prior, failures, observed, expected", [
    (DAY, 0, 0.0, DAY),  # nothing seen yet: the prior
    (DAY, 0, 6 * DAY, 7 * DAY),  # six days without a failure: the estimate grows
    (DAY, 1, DAY, DAY),  # one failure in a day, and the prior's one in a day
    (DAY, 3, 3600.0, (DAY + 3600) / 4),  # three failures in an hour pull it down at once
    (3600.0, 9, 9 * 3600.0, 3600.0),
])
def test_mtbf_counts_the_prior_as_one_failure_seen(prior, failures, observed, expected):
    assert estimate_mtbf(prior, failures, observed) == pytest.approx(expected)


@pytest.mark.parametrize("cost, prior, reliability, seconds, why", [
    (None, DAY, Reliability(0, 0.0), BOOTSTRAP_S, "no save measured yet"),
    (SaveCost(stall_s=0.15, persist_s=0.6), DAY, Reliability(0, 0.0), math.sqrt(2 * 0.15 * DAY), "sqrt(2"),
    # the stall is tiny but the save takes 40 s to persist: never shorter than that
    (SaveCost(stall_s=0.001, persist_s=40.0), 3600.0, Reliability(0, 0.0), 40.0, "persist"),
    # everything is nearly free: never shorter than the floor
    (SaveCost(stall_s=1e-6, persist_s=1e-4), 3600.0, Reliability(0, 0.0), MIN_INTERVAL_S, "floor"),
    # failures every ten minutes: save much more often
    (SaveCost(stall_s=0.5, persist_s=2.0), DAY, Reliability(20, 20 * 600.0),
     math.sqrt(2 * 0.5 * (DAY + 12000) / 21), "sqrt(2"),
])
def test_auto_interval(cost, prior, reliability, seconds, why):
    interval = auto_interval(cost, prior, reliability)
    assert interval.seconds == pytest.approx(seconds)
    assert why in interval.why
    assert interval.mtbf_s == pytest.approx(estimate_mtbf(prior, reliability.failures, reliability.observed_s))


def test_the_interval_says_its_inputs():
    interval = auto_interval(SaveCost(0.15, 0.6), DAY, Reliability(2, 7200.0))
    for part in ("stall 0.15s", "persist 0.6s", "2 failures in 2.0h", "prior 24.0h", "MTBF"):
        assert part in interval.why, interval.why


@pytest.mark.parametrize("old, new, expected", [
    (None, 100.0, True),  # the first one is always said
    (100.0, 105.0, False),  # within 10 %: the same interval, not worth a log line
    (100.0, 89.0, True),
    (100.0, 111.0, True),
])
def test_worth_announcing(old, new, expected):
    before = None if old is None else Interval(old, DAY, None, "")
    assert worth_announcing(before, Interval(new, DAY, None, "")) is expected


@pytest.mark.parametrize("previous, measured, expected", [
    (None, SaveCost(1.0, 2.0), SaveCost(1.0, 2.0)),  # the first measurement stands alone
    (SaveCost(1.0, 2.0), SaveCost(2.0, 4.0), SaveCost(1.3, 2.6)),  # 30 % weight to the newest
])
def test_costs_are_smoothed(previous, measured, expected):
    got = smooth(previous, measured)
    assert got.stall_s == pytest.approx(expected.stall_s) and got.persist_s == pytest.approx(expected.persist_s)


def test_reliability_from_text_is_forgiving_of_nothing_but_strict_about_junk():
    assert Reliability.parse("") == Reliability(0, 0.0)
    assert Reliability.parse('{"failures": 3, "observed_s": 120.5}') == Reliability(3, 120.5)
    for junk in ("nonsense", '{"failures": -1, "observed_s": 5}', '{"failures": 1}', "[]",
                 '{"failures": 1, "observed_s": NaN}', '{"failures": true, "observed_s": 5}'):
        with pytest.raises(ValueError):
            Reliability.parse(junk)
