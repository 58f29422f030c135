"""What the local tier keeps for the bucket: bounded by the bucket's own policy, even in an outage."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Mapping

import pytest

from savegame.strategies import AnyOf, KeepBest, KeepLast, plan_retention
from savegame.strategies.tiers import awaiting_upload

pytestmark = pytest.mark.unit
NOW = datetime(2026, 1, 10, 12, 0, tzinfo=timezone.utc)


@dataclass(frozen=True)
class Ck:
    step: int
    epoch: int = 0
    created: datetime = NOW
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = "periodic"


def listing(steps, loss=None):
    return [Ck(s, created=NOW - timedelta(seconds=1000 - s), metrics={"loss": loss[s]} if loss and s in loss else {})
            for s in steps]


def test_an_outage_keeps_what_the_bucket_would_keep_not_everything():
    """The bucket holds steps up to 10 and then stops answering; 136 checkpoints pile up locally."""
    remote = listing([5, 10])
    local = listing(range(5, 141))
    bucket = KeepLast(3)
    waiting = awaiting_upload(local, remote, bucket, NOW)
    assert waiting == [140, 139, 138]
    local_plan = plan_retention(local, KeepLast(2), NOW, protected={s: "not yet mirrored" for s in waiting})
    assert sorted(local_plan.keep) == [138, 139, 140]


def test_the_best_waits_for_the_bucket_and_what_the_bucket_holds_does_not():
    loss = {s: 1.0 for s in range(10, 60, 10)}
    loss[20] = 0.1
    local = listing(range(10, 60, 10), loss)
    policy = AnyOf((KeepLast(1), KeepBest(1, "loss", "min")))
    assert awaiting_upload(local, [], policy, NOW, monitor=("loss", "min")) == [50, 20]
    assert awaiting_upload(local, listing([20], loss), policy, NOW, monitor=("loss", "min")) == [50]


def test_unmirrorable_steps_are_left_to_the_local_policy():
    assert awaiting_upload(listing([1, 2, 3]), [], KeepLast(2), NOW, unmirrorable=[3]) == [2]
