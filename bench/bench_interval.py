"""Fixed vs adaptive (`every_seconds = "auto"`) save intervals, replayed over synthetic failure traces.
Prints JSON (run: .venv/bin/python bench/bench_interval.py [--quick]).

A simulation, not a measurement: a run must do W seconds of training; failures without notice
arrive as a Poisson process (exponential gaps, mean = the true MTBF; the same traces for every
policy); a save stalls training for C seconds and is committed P seconds later, in the background
(a failure before the commit loses that save); a failure loses the work since the last commit and
costs R seconds to restart and reload. The auto policy is the worker's own code
(strategies/interval.py): it starts from the bootstrap interval, measures C and P from its saves,
and estimates the MTBF from the failures it has seen with a 24 h prior (wrong on purpose, since
the true MTBF here is shorter). "oracle" is sqrt(2 C M) with the true M.

Per policy and scenario, averaged over the traces: wall time, time spent saving (stalls), work lost
(redone), overhead = (wall - W) / W, and the number of saves and failures.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from savegame.strategies.interval import Reliability, SaveCost, auto_interval, smooth, young_daly  # noqa: E402

HOUR = 3600.0
PRIOR_S = 24 * HOUR


@dataclass(frozen=True)
class Scenario:
    name: str
    work_s: float  # training to do
    stall_s: float  # C: training blocked per save
    persist_s: float  # P: save -> committed, in the background
    mtbf_s: float  # the true mean time between failures
    restart_s: float  # R: restart and reload after a failure


@dataclass
class Outcome:
    wall_s: float = 0.0
    saving_s: float = 0.0
    lost_s: float = 0.0
    saves: int = 0
    failures: int = 0


Policy = Callable[[Optional[SaveCost], int, float], float]  # (measured cost, failures seen, observed) -> interval


def fixed(seconds: float) -> Policy:
    return lambda cost, failures, observed: seconds


def auto(cost: Optional[SaveCost], failures: int, observed: float) -> float:
    return auto_interval(cost, PRIOR_S, Reliability(failures, observed)).seconds


def oracle(scenario: Scenario) -> Policy:
    return fixed(max(young_daly(scenario.stall_s, scenario.mtbf_s), scenario.persist_s))


def simulate(s: Scenario, policy: Policy, failures_at: list[float]) -> Outcome:
    """Replay one failure trace (wall-clock times) under one policy."""
    out, t, done, committed = Outcome(), 0.0, 0.0, 0.0
    pending: Optional[tuple[float, float]] = None  # (commit time, work it holds)
    cost: Optional[SaveCost] = None
    trace = iter(failures_at)
    next_failure = next(trace, math.inf)
    while done < s.work_s:
        interval = policy(cost, out.failures, t)
        run = min(interval, s.work_s - done)
        if pending and pending[0] <= t:
            committed, pending = pending[1], None
        if t + run + s.stall_s <= next_failure:  # the segment and its save both happen
            t, done = t + run, done + run
            if done >= s.work_s:
                break
            t += s.stall_s
            out.saving_s += s.stall_s
            out.saves += 1
            if pending:  # back-pressure: the one in flight commits first, and training waits for it
                wait = max(0.0, pending[0] - t)
                t, out.saving_s, committed = t + wait, out.saving_s + wait, pending[1]
            pending = (t + s.persist_s, done)
            cost = smooth(cost, SaveCost(s.stall_s, s.persist_s))
            continue
        if pending and pending[0] <= next_failure:
            committed = pending[1]
        pending = None
        out.lost_s += done + min(next_failure - t, run) - committed  # trained since the last commit
        out.failures += 1
        done, t = committed, next_failure + s.restart_s
        while next_failure < t:
            next_failure = next(trace, math.inf)
    out.wall_s = t
    return out


def trace(seed: int, mtbf_s: float, horizon_s: float) -> list[float]:
    rng, t, times = random.Random(seed), 0.0, []
    while t < horizon_s:
        t += rng.expovariate(1.0 / mtbf_s)
        times.append(t)
    return times


def compare(s: Scenario, seeds: int) -> dict:
    traces = [trace(seed, s.mtbf_s, s.work_s * 20) for seed in range(seeds)]
    policies: dict[str, Policy] = {"fixed 1m": fixed(60), "fixed 5m": fixed(300), "fixed 30m (regime long)": fixed(1800),
                                   "fixed 2h": fixed(7200), "auto": auto, "oracle sqrt(2CM)": oracle(s)}
    figures = {}
    for name, policy in policies.items():
        runs = [simulate(s, policy, t) for t in traces]
        mean = {k: statistics.fmean(getattr(r, k) for r in runs) for k in ("wall_s", "saving_s", "lost_s", "saves",
                                                                          "failures")}
        figures[name] = {"overhead": round((mean["wall_s"] - s.work_s) / s.work_s, 4),
                         "saving_h": round(mean["saving_s"] / HOUR, 3), "lost_h": round(mean["lost_s"] / HOUR, 3),
                         "saves": round(mean["saves"]), "failures": round(mean["failures"], 1)}
    best_fixed = min((v["overhead"], k) for k, v in figures.items() if k.startswith("fixed"))
    return {"scenario": s.__dict__, "policies": figures,
            "auto_overhead_vs_best_fixed": {"best_fixed": best_fixed[1],
                                            "ratio": round(figures["auto"]["overhead"] / best_fixed[0], 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer traces")
    seeds = 8 if parser.parse_args().quick else 40
    week = 7 * 24 * HOUR
    scenarios = [
        Scenario("async saves (0.15 s stall, 1 GiB), a failure every 6 h", week, 0.15, 0.6, 6 * HOUR, 120),
        Scenario("synchronous saves (5 s stall, torch.save-like), a failure every 2 h", week, 5.0, 5.0, 2 * HOUR, 120),
        Scenario("big state (2 s stall, 60 s to persist), a failure a day", week, 2.0, 60.0, 24 * HOUR, 300),
        Scenario("flaky spot fleet (0.15 s stall), a failure every 30 min", 2 * 24 * HOUR, 0.15, 0.6, 0.5 * HOUR, 60),
    ]
    print(json.dumps({"bench": "interval", "traces": seeds, "results": [compare(s, seeds) for s in scenarios]},
                     indent=1))


if __name__ == "__main__":
    main()
