"""Retention: every policy table-driven, the regimes through config, and the invariants of
plan_retention as properties over random listings."""
from __future__ import annotations

import math
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from savegame.config import Layer, build_config
from savegame.inspect_cmds import prune
from savegame.storage import CheckpointStore
from savegame.strategies import (AnyOf, KeepBest, KeepEvery, KeepLast, KeepThinning, ThinningTier,
                                 plan_retention)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)
PROPS = settings(database=None, deadline=None, max_examples=300,
                 suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Ck:
    """A checkpoint as retention sees it (storage's CheckpointInfo has the same properties)."""

    step: int
    epoch: int = 0
    created: datetime = NOW
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = "periodic"


def series(steps, *, metric=None, values=None, minutes_apart=10, epoch_every=None):
    """Checkpoints at `steps`, created `minutes_apart` apart, the last one at NOW."""
    out = []
    for i, step in enumerate(steps):
        metrics = {metric: values[i]} if metric and values and values[i] is not None else {}
        epoch = step // epoch_every if epoch_every else 0
        created = NOW - timedelta(minutes=minutes_apart * (len(steps) - 1 - i))
        out.append(Ck(step, epoch, created, metrics))
    return out


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------- policies, table-driven

@pytest.mark.parametrize("n, steps, expected", [
    (0, [1, 2, 3], set()),
    (1, [1, 2, 3], {3}),
    (3, [10, 20, 30, 40, 50], {30, 40, 50}),
    (10, [10, 20], {10, 20}),
    (2, [50, 10, 40, 20], {40, 50}),  # unsorted input
    (2, [], set()),
])
def test_keep_last(n, steps, expected):
    kept = KeepLast(n).keep([Ck(s) for s in steps], NOW)
    assert set(kept) == expected
    assert all(why == [f"last {n}"] for why in kept.values())


@pytest.mark.parametrize("k, mode, values, expected", [
    (1, "max", [0.1, 0.9, 0.5], {2}),
    (1, "min", [0.1, 0.9, 0.5], {1}),
    (2, "max", [0.1, 0.9, 0.5, 0.7], {2, 4}),
    (2, "min", [3.0, 1.0, 2.0, 0.5], {2, 4}),
    (0, "max", [0.1, 0.9], set()),
    (5, "max", [0.1, 0.9], {1, 2}),
    # checkpoints without the metric are never kept by KeepBest, even when k is large
    (3, "max", [None, 0.2, None, 0.1], {2, 4}),
    (1, "max", [None, None], set()),
    # NaN is not a value: it never wins
    (1, "max", [0.3, math.nan, 0.2], {1}),
    (1, "min", [math.nan, 0.3, 0.2], {3}),
    # ties go to the newer step
    (1, "max", [0.5, 0.5, 0.1], {2}),
    (1, "min", [0.1, 0.5, 0.1], {3}),
])
def test_keep_best(k, mode, values, expected):
    cks = [Ck(i + 1, metrics={} if v is None else {"val": v}) for i, v in enumerate(values)]
    kept = KeepBest(k, "val", mode).keep(cks, NOW)
    assert set(kept) == expected
    assert all(why == [f"best {k} by val ({mode})"] for why in kept.values())


def test_keep_best_ignores_other_metrics():
    cks = [Ck(1, metrics={"loss": 0.1}), Ck(2, metrics={"val": 0.4, "loss": 9.0}), Ck(3)]
    assert set(KeepBest(3, "val", "max").keep(cks, NOW)) == {2}


@pytest.mark.parametrize("n, unit, cks, expected", [
    (100, "step", [Ck(s) for s in (50, 100, 150, 200, 250, 310)], {50, 100, 200, 310}),
    (100, "step", [Ck(s) for s in (310, 150, 100, 50)], {50, 100, 310}),  # unsorted
    (100, "step", [Ck(s) for s in (120, 180, 420)], {120, 420}),  # empty buckets are just empty
    (0, "step", [Ck(s) for s in (1, 2, 3)], set()),
    (-1, "step", [Ck(s) for s in (1, 2, 3)], set()),
    (2, "epoch", [Ck(s, e) for s, e in ((10, 0), (20, 1), (30, 2), (40, 2), (50, 3), (60, 4), (70, 5))],
     {10, 30, 60}),
    (1, "epoch", [Ck(s, e) for s, e in ((10, 1), (20, 1), (30, 2))], {10, 30}),
])
def test_keep_every(n, unit, cks, expected):
    kept = KeepEvery(n, unit).keep(cks, NOW)
    assert set(kept) == expected
    assert all(why == [f"every {n} {unit}s"] for why in kept.values())


TWO_TIERS = (ThinningTier(timedelta(hours=2), timedelta(minutes=30)), ThinningTier(None, timedelta(days=1)))


@pytest.mark.parametrize("tiers, created, expected", [
    # younger than 2 h: one per half hour (the oldest of each slice); older: one per UTC day
    (TWO_TIERS,
     ["2026-01-10T11:50", "2026-01-10T11:40", "2026-01-10T11:20", "2026-01-10T11:05", "2026-01-10T10:45",
      "2026-01-10T10:10", "2026-01-10T09:50", "2026-01-10T03:00", "2026-01-09T23:00", "2026-01-09T01:00"],
     {"2026-01-10T11:40", "2026-01-10T11:05", "2026-01-10T10:45", "2026-01-10T10:10", "2026-01-10T03:00",
      "2026-01-09T01:00"}),
    # older than every tier: not kept by thinning
    ((ThinningTier(timedelta(hours=1), timedelta(minutes=10)),),
     ["2026-01-10T11:55", "2026-01-10T11:52", "2026-01-10T11:41", "2026-01-10T10:30", "2026-01-09T12:00"],
     {"2026-01-10T11:52", "2026-01-10T11:41"}),
    # a single unlimited tier: one per hour, however old
    ((ThinningTier(None, timedelta(hours=1)),),
     ["2025-06-01T00:10", "2025-06-01T00:50", "2025-06-01T01:00", "2026-01-10T11:59"],
     {"2025-06-01T00:10", "2025-06-01T01:00", "2026-01-10T11:59"}),
    ((ThinningTier(None, timedelta(hours=1)),), [], set()),
])
def test_keep_thinning(tiers, created, expected):
    cks = [Ck(step=i + 1, created=at(c)) for i, c in enumerate(sorted(created))]
    kept = KeepThinning(tiers).keep(cks, NOW)
    assert {c.created for c in cks if c.step in kept} == {at(c) for c in expected}
    assert all(len(why) == 1 and why[0].startswith("thinning: one per ") for why in kept.values())


def test_keep_thinning_reason_names_the_spacing():
    cks = [Ck(1, created=at("2026-01-10T11:00")), Ck(2, created=at("2026-01-01T00:00"))]
    kept = KeepThinning(TWO_TIERS).keep(cks, NOW)
    assert kept == {1: ["thinning: one per 30m"], 2: ["thinning: one per 1d"]}


def test_keep_thinning_choice_is_stable_as_time_passes():
    """A checkpoint thinning drops is never needed again later: later plans keep a subset of what
    remains (checkpoints every 7 minutes, evaluated every 13 minutes over three days)."""
    tiers = (ThinningTier(timedelta(days=1), timedelta(hours=1)), ThinningTier(None, timedelta(days=1)))
    start = at("2026-01-07T00:00")
    alive: list[Ck] = []
    step = 0
    for tick in range(0, 3 * 24 * 60, 13):
        now = start + timedelta(minutes=tick)
        while start + timedelta(minutes=7 * step) <= now:
            alive.append(Ck(step, created=start + timedelta(minutes=7 * step)))
            step += 1
        kept = KeepThinning(tiers).keep(alive, now)
        alive = [c for c in alive if c.step in kept or c.step == alive[-1].step]
    ages = sorted((start + timedelta(minutes=3 * 24 * 60) - c.created) for c in alive)
    young = [a for a in ages if a < timedelta(days=1)]
    assert 20 <= len(young) <= 26  # about one per hour for the last day
    assert len(alive) - len(young) <= 4  # about one per day before that


def test_any_of_unions_and_merges_reasons():
    cks = [Ck(s, metrics={"acc": v}) for s, v in ((1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3))]
    policy = AnyOf((KeepLast(2), KeepBest(1, "acc", "max"), KeepLast(1), KeepEvery(2)))
    kept = policy.keep(cks, NOW)
    assert kept == {1: ["best 1 by acc (max)", "every 2 steps"], 2: ["every 2 steps"],
                    3: ["last 2"], 4: ["last 2", "last 1", "every 2 steps"]}
    assert AnyOf(()).keep(cks, NOW) == {}


# ---------------------------------------------------------------- plan_retention, table-driven

@pytest.mark.parametrize("policy, monitor, protected, expected_keep", [
    (KeepLast(0), None, None, {5: ["newest"]}),
    (KeepLast(2), None, None, {4: ["last 2"], 5: ["last 2", "newest"]}),
    (KeepLast(1), ("acc", "max"), None, {2: ["best acc"], 5: ["last 1", "newest"]}),
    (KeepLast(1), ("acc", "min"), None, {1: ["best acc"], 5: ["last 1", "newest"]}),
    (KeepLast(1), None, {3: "resume source", 99: "not there"}, {3: ["resume source"], 5: ["last 1", "newest"]}),
    (KeepBest(1, "acc", "max"), ("acc", "max"), None, {2: ["best 1 by acc (max)", "best acc"], 5: ["newest"]}),
    (KeepLast(1), ("missing", "max"), None, {5: ["last 1", "newest"]}),
])
def test_plan_retention_table(policy, monitor, protected, expected_keep):
    cks = [Ck(s, metrics={"acc": v}) for s, v in ((1, 0.1), (2, 0.9), (3, 0.5), (4, 0.4), (5, 0.3))]
    plan = plan_retention(cks, policy, NOW, monitor=monitor, protected=protected)
    assert plan.keep == expected_keep
    assert plan.delete == sorted(set(range(1, 6)) - set(expected_keep))


def test_plan_retention_of_nothing():
    plan = plan_retention([], KeepLast(3), NOW, monitor=("acc", "max"), protected={7: "resume"})
    assert plan.keep == {} and plan.delete == []


# ---------------------------------------------------------------- the regimes, through config

def regime_config(regime, **extra):
    return build_config([Layer("test", {"regime": regime, **extra})])


def plan_for(config, cks, now=NOW):
    return plan_retention(cks, config.retention(), now, monitor=config.monitor)


def test_short_regime_keeps_the_latest_and_the_best():
    cks = series(range(1, 9), metric="val_acc", values=[0.5, 0.6, 0.9, 0.7, 0.8, 0.6, 0.7, 0.65])
    plan = plan_for(regime_config("short", monitor="val_acc"), cks)
    assert set(plan.keep) == {3, 8}
    assert plan.delete == [1, 2, 4, 5, 6, 7]


def test_short_regime_without_a_metric_keeps_the_latest_only():
    plan = plan_for(regime_config("short"), series(range(1, 6)))
    assert set(plan.keep) == {5}


def test_short_regime_saves_every_epoch_and_on_improvement():
    from savegame.strategies import History, Moment

    schedule = regime_config("short", monitor="val_loss").schedule()
    history = History(last_step=None, last_time=0.0, best=0.5)
    assert schedule.due(Moment(100, 1, 1.0, at_epoch_end=True, metrics={"val_loss": 0.6}), history) == "periodic"
    assert schedule.due(Moment(150, 1, 1.0, metrics={"val_loss": 0.6}), history) is None
    assert schedule.due(Moment(150, 1, 1.0, metrics={"val_loss": 0.4}), history) == "best"  # auto: min for loss


def test_normal_regime_keeps_the_best_and_the_last_ten():
    values = [0.1, 0.95] + [0.5] * 13
    cks = series(range(1, 16), metric="val_acc", values=values)
    plan = plan_for(regime_config("normal", monitor="val_acc"), cks)
    assert set(plan.keep) == {2} | set(range(6, 16))
    assert plan.delete == [1, 3, 4, 5]


def test_long_regime_keeps_last_best_and_a_thinning_tail():
    # three days of saves every 30 minutes; the best three are old
    steps = list(range(0, 144 * 1000, 1000))
    values = [0.5] * len(steps)
    for i in (3, 7, 11):
        values[i] = 0.9 + i / 1000
    cks = series(steps, metric="val_acc", values=values, minutes_apart=30)
    config = regime_config("long", monitor="val_acc")
    plan = plan_for(config, cks)
    kept = set(plan.keep)
    assert {steps[-1], steps[-2], steps[-3]} <= kept  # last 3
    assert {steps[3], steps[7], steps[11]} <= kept  # best 3
    last_day = [c for c in cks if NOW - c.created < timedelta(days=1)]
    hours = {c.created.replace(minute=0) for c in last_day}
    assert len([c for c in last_day if c.step in kept]) >= len(hours)  # one per hour for a day
    older_kept = [c for c in cks if c.step in kept and NOW - c.created >= timedelta(days=1)]
    assert {c.created.date() for c in older_kept} == {c.created.date() for c in cks
                                                      if NOW - c.created >= timedelta(days=1)}
    assert len(kept) < len(cks) // 2


def test_long_regime_schedule_every_1000_steps_or_30_minutes():
    from savegame.strategies import History, Moment

    schedule = regime_config("long").schedule()
    history = History(last_step=0, last_time=0.0)
    assert schedule.due(Moment(1000, 0, 10.0), history) == "periodic"
    assert schedule.due(Moment(999, 0, 10.0), history) is None
    assert schedule.due(Moment(999, 0, 1800.0), history) == "periodic"


def test_regime_settings_can_be_overridden():
    config = build_config([Layer("a", {"regime": "normal", "keep": {"last": 2}})])
    plan = plan_for(config, series(range(1, 8)))
    assert set(plan.keep) == {6, 7}


# ---------------------------------------------------------------- properties over random runs

METRIC = "m"


@st.composite
def listings(draw):
    """A random run: unique steps, epochs growing with steps, times mostly growing, sparse metrics."""
    steps = sorted(draw(st.sets(st.integers(0, 5000), max_size=40)))
    epoch, out = 0, []
    for i, step in enumerate(steps):
        epoch += draw(st.integers(0, 2))
        minutes = draw(st.integers(0, 5 * 24 * 60))
        value = draw(st.one_of(st.none(), st.floats(-10, 10, allow_nan=False), st.just(math.nan),
                               st.sampled_from([0.0, 1.0])))
        metrics = {} if value is None else {METRIC: value}
        out.append(Ck(step, epoch, NOW - timedelta(minutes=minutes), metrics))
    return out


simple_policies = st.one_of(
    st.builds(KeepLast, st.integers(0, 6)),
    st.builds(KeepBest, st.integers(0, 4), st.just(METRIC), st.sampled_from(["min", "max"])),
    st.builds(KeepEvery, st.integers(0, 700), st.sampled_from(["step", "epoch"])),
    st.builds(lambda tiers: KeepThinning(tuple(tiers)), st.lists(
        st.builds(ThinningTier, st.one_of(st.none(), st.integers(1, 4000).map(lambda m: timedelta(minutes=m))),
                  st.integers(1, 2000).map(lambda m: timedelta(minutes=m))), max_size=3)),
)
policies = st.one_of(simple_policies, st.lists(simple_policies, max_size=4).map(lambda ps: AnyOf(tuple(ps))))
monitors = st.one_of(st.none(), st.tuples(st.just(METRIC), st.sampled_from(["min", "max"])))


def finite_values(cks):
    return [c.metrics[METRIC] for c in cks if METRIC in c.metrics and not math.isnan(c.metrics[METRIC])]


@PROPS
@given(cks=listings(), policy=policies, monitor=monitors, data=st.data())
def test_plan_invariants_always_hold(cks, policy, monitor, data):
    steps = [c.step for c in cks]
    protected = {s: "protected" for s in data.draw(st.lists(st.sampled_from(steps), max_size=3))} if steps else {}
    protected[10**9] = "not in the listing"
    plan = plan_retention(cks, policy, NOW, monitor=monitor, protected=protected)
    keep, delete = set(plan.keep), set(plan.delete)

    # delete is exactly the complement of keep, sorted, no duplicates; nothing outside the listing
    assert keep | delete == set(steps) and not keep & delete
    assert plan.delete == sorted(delete)
    # every kept step has at least one reason
    assert all(plan.keep[s] and all(isinstance(w, str) and w for w in plan.keep[s]) for s in keep)
    # the newest is kept
    if steps:
        assert max(steps) in keep
    # the best by the monitored metric is kept (some checkpoint holding the best value)
    values = finite_values(cks)
    if monitor is not None and values:
        best = max(values) if monitor[1] == "max" else min(values)
        assert any(c.step in keep for c in cks if c.metrics.get(METRIC) == best)
    # protected checkpoints are kept; a protected step that does not exist is not invented
    assert {s for s in protected if s in steps} <= keep
    assert 10**9 not in keep
    # never more deleted than the policy says: whatever the policy keeps survives
    assert not set(policy.keep(cks, NOW)) & delete


@PROPS
@given(cks=listings(), policy=policies, monitor=monitors)
def test_plan_is_order_independent_and_idempotent(cks, policy, monitor):
    plan = plan_retention(cks, policy, NOW, monitor=monitor)
    shuffled = list(cks)
    random.Random(len(cks)).shuffle(shuffled)
    assert plan_retention(shuffled, policy, NOW, monitor=monitor) == plan
    # a second prune right after the first deletes nothing
    survivors = [c for c in cks if c.step in plan.keep]
    assert plan_retention(survivors, policy, NOW, monitor=monitor).delete == []


@settings(database=None, deadline=None, max_examples=25)
@given(values=st.lists(st.one_of(st.none(), st.floats(0, 1)), min_size=1, max_size=12),
       last=st.integers(0, 3), best=st.integers(0, 2), every=st.integers(0, 5))
def test_prune_deletes_exactly_what_the_plan_says(values, last, best, every):
    """The real prune, on a real (in-memory) store: what survives is exactly what the plan keeps."""
    store = CheckpointStore(f"memory://retention-{uuid.uuid4().hex}/run")
    for step, value in enumerate(values):
        with store.begin(step) as staged:
            staged.write_bytes("w.bin", bytes([step]))
            staged.commit(epoch=step, metrics={} if value is None else {"val_acc": value})
    config = build_config([Layer("test", {"monitor": "val_acc", "mode": "max",
                                          "keep": {"last": last, "best": best, "every": every}})])
    planned = plan_retention(store.list(), config.retention(), NOW, monitor=config.monitor)
    result = prune(store, config, {}, dry_run=False, now=NOW)
    assert [d["step"] for d in result["delete"]] == planned.delete
    assert [c.step for c in store.list()] == sorted(planned.keep)


def test_a_policy_that_knows_no_metric_never_deletes_a_checkpoint_saved_as_best():
    checkpoints = [Ck(10, reason="best", metrics={"val_acc": 0.9}), Ck(20), Ck(30), Ck(40, reason="best")]
    plan = plan_retention(checkpoints, KeepLast(1), NOW)
    assert plan.delete == [20, 30]
    assert "saved as best" in plan.keep[10][0]
    known = plan_retention(checkpoints, KeepLast(1), NOW, monitor=("val_acc", "max"))
    assert known.delete == [20, 30] and "best val_acc" in known.keep[10]
    assert plan_retention(checkpoints, KeepLast(1), NOW, monitor=("loss", "min")).delete == [10, 20, 30]
