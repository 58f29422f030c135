"""What to resume from: candidates in preference order, so a damaged one falls back to the next."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.strategies import resume_candidates

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Ck:
    step: int
    metrics: Mapping[str, float] = field(default_factory=dict)


RUN = [Ck(100, {"acc": 0.5}), Ck(300, {"acc": 0.9}), Ck(200, {"acc": 0.7}), Ck(400), Ck(500, {"acc": 0.6})]


@pytest.mark.parametrize("choice, metric, mode, expected", [
    ("latest", None, "max", [500, 400, 300, 200, 100]),
    ("none", None, "max", []),
    ("best", "acc", "max", [300, 200, 500, 100, 400]),  # then those without the metric, newest first
    ("best", "acc", "min", [100, 500, 200, 300, 400]),
    ("best", "loss", "min", [500, 400, 300, 200, 100]),  # nobody has it: newest first
])
def test_resume_candidates(choice, metric, mode, expected):
    assert [c.step for c in resume_candidates(RUN, choice, metric, mode)] == expected


def test_empty_run_has_no_candidates():
    assert resume_candidates([], "latest") == []
    assert resume_candidates([], "best", "acc") == []


def test_best_ties_prefer_the_newer_and_nan_never_wins():
    run = [Ck(1, {"acc": 0.8}), Ck(2, {"acc": math.nan}), Ck(3, {"acc": 0.8}), Ck(4, {"acc": 0.1})]
    assert [c.step for c in resume_candidates(run, "best", "acc", "max")] == [3, 1, 4, 2]


@pytest.mark.parametrize("choice, metric, message", [
    ("best", None, "needs a monitored metric"),
    ("oldest", None, "must be one of"),
    ("", None, "must be one of"),
])
def test_bad_choices(choice, metric, message):
    with pytest.raises(ValueError, match=message):
        resume_candidates(RUN, choice, metric)


@settings(database=None, deadline=None, max_examples=200)
@given(values=st.lists(st.one_of(st.none(), st.floats(-1, 1)), max_size=20),
       choice=st.sampled_from(["latest", "best"]), mode=st.sampled_from(["min", "max"]))
def test_candidates_are_a_permutation_of_the_run(values, choice, mode):
    run = [Ck(i * 10, {} if v is None else {"acc": v}) for i, v in enumerate(values)]
    candidates = resume_candidates(run, choice, "acc", mode)
    assert sorted(c.step for c in candidates) == [c.step for c in run]
    if choice == "latest" and run:
        assert candidates[0].step == run[-1].step
