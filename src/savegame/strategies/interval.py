"""The adaptive save interval (`every_seconds = "auto"`): how often to save, from what a save costs
and how often this run fails. Pure: measurements and counts in, seconds out.

Young (1974) and Daly (2006): with a checkpoint cost C and a mean time between failures M, the
interval that minimises the time lost (time spent saving plus work redone after a failure) is about
sqrt(2 C M). C is the training stall of a save (saves persist in the background), and the interval
is never shorter than a save takes to persist: at most one save is in flight, so saving more often
would only stall on back-pressure.

M comes from the run's record of failures with a prior: the prior counts as one failure seen over
`prior_s`, so M = (prior_s + observed_s) / (1 + failures). A run with no failure starts at the
prior and the estimate grows as hours pass without one; every failure pulls it down at once.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

BOOTSTRAP_S = 60.0  # no save measured yet: save this soon, to measure what one costs
MIN_INTERVAL_S = 1.0  # saves that cost next to nothing still do not run at every step
CHANGE = 0.1  # an interval is announced again once it moves by more than this fraction
SMOOTHING = 0.3  # the weight of the newest measurement


@dataclass(frozen=True)
class SaveCost:
    stall_s: float  # the training thread was blocked this long by a save
    persist_s: float  # from handing a save to the writer to its commit


@dataclass(frozen=True)
class Reliability:
    """What the run has seen: failures (preemptions included) over the time its workers ran."""

    failures: int
    observed_s: float

    @staticmethod
    def parse(text: str) -> "Reliability":
        """From the daemon's JSON (`{"failures": 3, "observed_s": 7200.0}`); empty: nothing seen."""
        if not text.strip():
            return Reliability(0, 0.0)
        data: Any = json.loads(text, parse_constant=_no_constant)
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        failures, observed = data.get("failures"), data.get("observed_s")
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
            raise ValueError("failures must be an integer >= 0")
        if isinstance(observed, bool) or not isinstance(observed, (int, float)) or not 0 <= observed < math.inf:
            raise ValueError("observed_s must be a finite number >= 0")
        return Reliability(failures, float(observed))


@dataclass(frozen=True)
class Interval:
    seconds: float
    mtbf_s: float
    cost: Optional[SaveCost]
    why: str  # the inputs and the rule, for the log


def young_daly(cost_s: float, mtbf_s: float) -> float:
    return math.sqrt(2.0 * cost_s * mtbf_s)


def estimate_mtbf(prior_s: float, failures: int, observed_s: float) -> float:
    return (prior_s + observed_s) / (1 + failures)


def auto_interval(cost: Optional[SaveCost], prior_s: float, seen: Reliability) -> Interval:
    """The interval to save at now, and why."""
    mtbf = estimate_mtbf(prior_s, seen.failures, seen.observed_s)
    inputs = (f"MTBF {_h(mtbf)} ({seen.failures} failures in {_h(seen.observed_s)}, prior {_h(prior_s)})")
    if cost is None:
        return Interval(BOOTSTRAP_S, mtbf, None, f"no save measured yet: {BOOTSTRAP_S:g}s, to measure one; {inputs}")
    ideal = young_daly(cost.stall_s, mtbf)
    measured = f"stall {cost.stall_s:.3g}s, persist {cost.persist_s:.3g}s, {inputs}"
    if ideal >= max(cost.persist_s, MIN_INTERVAL_S):
        return Interval(ideal, mtbf, cost, f"sqrt(2 x stall x MTBF) = {ideal:.1f}s from {measured}")
    if cost.persist_s >= MIN_INTERVAL_S:
        return Interval(cost.persist_s, mtbf, cost, f"the time a save takes to persist, {cost.persist_s:.1f}s "
                                                    f"(sqrt(2 x stall x MTBF) = {ideal:.2f}s is shorter), from {measured}")
    return Interval(MIN_INTERVAL_S, mtbf, cost, f"the floor, {MIN_INTERVAL_S:g}s (sqrt(2 x stall x MTBF) = "
                                                f"{ideal:.2f}s is shorter), from {measured}")


def worth_announcing(old: Optional[Interval], new: Interval, change: float = CHANGE) -> bool:
    """Whether the interval moved enough to be logged (and the schedule changed)."""
    return old is None or abs(new.seconds - old.seconds) > change * old.seconds


def smooth(previous: Optional[SaveCost], measured: SaveCost, weight: float = SMOOTHING) -> SaveCost:
    """An exponentially weighted mean: one slow save (a busy disk) moves the estimate, not all of it."""
    if previous is None:
        return measured
    return SaveCost(previous.stall_s + weight * (measured.stall_s - previous.stall_s),
                    previous.persist_s + weight * (measured.persist_s - previous.persist_s))


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.1f}h" if seconds >= 3600 else f"{seconds:.0f}s"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")
