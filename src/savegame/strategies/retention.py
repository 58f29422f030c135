"""Retention: which committed checkpoints to keep. Pure functions of a listing and a clock.

Each policy answers "which steps do I keep, and why". `plan_retention` combines a policy with the
invariants that hold whatever the policy says, in this one place:
- the newest committed checkpoint is kept;
- the best one by the monitored metric is kept;
- protected checkpoints are kept (the resume source, those the mirror has not confirmed);
- when no metric is known, every checkpoint saved as "best" is kept: a policy that does not know
  what "best" means must not delete what was best by some metric.
Only committed checkpoints are ever passed in, so nothing uncommitted can be chosen for deletion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Mapping, Optional, Protocol, Sequence

from savegame.strategies.metrics import Mode, rank_by_metric


class Checkpoint(Protocol):
    """What retention needs to know of a checkpoint (storage's CheckpointInfo fits)."""

    @property
    def step(self) -> int: ...
    @property
    def epoch(self) -> int: ...
    @property
    def created(self) -> datetime: ...
    @property
    def metrics(self) -> Mapping[str, float]: ...


Reasons = dict[int, list[str]]


class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[Checkpoint], now: datetime) -> Reasons:
        """Steps to keep, each with the reasons why."""
        ...


@dataclass(frozen=True)
class KeepLast:
    n: int

    def keep(self, checkpoints: Sequence[Checkpoint], now: datetime) -> Reasons:
        newest = sorted(checkpoints, key=lambda c: c.step)[-self.n:] if self.n > 0 else []
        return {c.step: [f"last {self.n}"] for c in newest}


@dataclass(frozen=True)
class KeepBest:
    """The best k by a metric. Checkpoints without the metric are never kept by this policy."""

    k: int
    metric: str
    mode: Mode

    def keep(self, checkpoints: Sequence[Checkpoint], now: datetime) -> Reasons:
        ranked = rank_by_metric(checkpoints, self.metric, self.mode)[: max(self.k, 0)]
        return {c.step: [f"best {self.k} by {self.metric} ({self.mode})"] for c in ranked}


@dataclass(frozen=True)
class KeepEvery:
    """The first checkpoint at or after every multiple of n steps (or epochs): a sparse, stable tail."""

    n: int
    unit: Literal["step", "epoch"] = "step"

    def keep(self, checkpoints: Sequence[Checkpoint], now: datetime) -> Reasons:
        if self.n <= 0:
            return {}
        first_in_bucket: dict[int, Checkpoint] = {}
        for c in sorted(checkpoints, key=lambda c: c.step):
            bucket = (c.step if self.unit == "step" else c.epoch) // self.n
            first_in_bucket.setdefault(bucket, c)
        return {c.step: [f"every {self.n} {self.unit}s"] for c in first_in_bucket.values()}


@dataclass(frozen=True)
class ThinningTier:
    """For checkpoints younger than `younger_than`, keep one per `spacing` (None: no age limit)."""

    younger_than: Optional[timedelta]
    spacing: timedelta


@dataclass(frozen=True)
class KeepThinning:
    """A tail that thins with age, e.g. one per hour for a day, then one per day.

    Buckets are fixed slices of wall-clock time, and the oldest checkpoint of a bucket is the one
    kept, so the choice is stable as time passes. Checkpoints older than every tier are not kept.
    """

    tiers: tuple[ThinningTier, ...]

    def keep(self, checkpoints: Sequence[Checkpoint], now: datetime) -> Reasons:
        chosen: dict[tuple[int, int], Checkpoint] = {}
        for c in sorted(checkpoints, key=lambda c: (c.created, c.step)):
            tier_index = self._tier_for(now - c.created)
            if tier_index is None:
                continue
            spacing = self.tiers[tier_index].spacing.total_seconds()
            bucket = math.floor(c.created.timestamp() / spacing)
            chosen.setdefault((tier_index, bucket), c)
        return {c.step: [f"thinning: one per {_human(self.tiers[t].spacing)}"] for (t, _), c in chosen.items()}

    def _tier_for(self, age: timedelta) -> Optional[int]:
        for index, tier in enumerate(self.tiers):
            if tier.younger_than is None or age < tier.younger_than:
                return index
        return None


@dataclass(frozen=True)
class AnyOf:
    """Keep what any of the policies keeps."""

    policies: tuple[RetentionPolicy, ...]

    def keep(self, checkpoints: Sequence[Checkpoint], now: datetime) -> Reasons:
        merged: Reasons = {}
        for policy in self.policies:
            for step, why in policy.keep(checkpoints, now).items():
                merged.setdefault(step, []).extend(w for w in why if w not in merged.get(step, []))
        return merged


@dataclass(frozen=True)
class RetentionPlan:
    keep: dict[int, list[str]]
    delete: list[int]


def plan_retention(checkpoints: Sequence[Checkpoint], policy: RetentionPolicy, now: datetime, *,
                   monitor: Optional[tuple[str, Mode]] = None,
                   protected: Optional[Mapping[int, str]] = None) -> RetentionPlan:
    """Apply a policy plus the invariants. Every kept step carries its reasons; deletion is the rest."""
    keep = {step: list(why) for step, why in policy.keep(checkpoints, now).items()}
    by_step = {c.step: c for c in checkpoints}

    def add(step: int, why: str) -> None:
        if step in by_step:
            keep.setdefault(step, [])
            if why not in keep[step]:
                keep[step].append(why)

    if checkpoints:
        add(max(by_step), "newest")
    if monitor is not None:
        ranked = rank_by_metric(checkpoints, monitor[0], monitor[1])
        if ranked:
            add(ranked[0].step, f"best {monitor[0]}")
    else:
        for c in checkpoints:
            if getattr(c, "reason", None) == "best":
                add(c.step, "saved as best (the metric is not known here)")
    for step, why in (protected or {}).items():
        add(step, why)
    delete = sorted(step for step in by_step if step not in keep)
    return RetentionPlan(keep=dict(sorted(keep.items())), delete=delete)


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
