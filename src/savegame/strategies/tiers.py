"""Two tiers, one decision: what the bucket still needs from the local disk.

The local tier may delete a checkpoint once its own policy lets it go, unless the bucket's policy
wants it and the bucket does not hold it yet. "Wants" is judged over everything either tier holds,
as if the bucket received every local checkpoint now: so during a mirror outage the local disk keeps
what the local policy keeps plus the few the bucket would keep (its last n, its best), not
everything since the outage began. Pure: listings and a clock in, steps out.
"""
from __future__ import annotations

from datetime import datetime
from typing import Iterable, Optional, Sequence

from savegame.strategies.metrics import Mode
from savegame.strategies.retention import Checkpoint, RetentionPolicy, plan_retention


def awaiting_upload(local: Sequence[Checkpoint], remote: Sequence[Checkpoint], policy: RetentionPolicy,
                    now: datetime, *, monitor: Optional[tuple[str, Mode]] = None,
                    unmirrorable: Iterable[int] = ()) -> list[int]:
    """Local steps the bucket's policy keeps and the bucket does not hold, newest first."""
    union = {c.step: c for c in remote}
    union.update({c.step: c for c in local})
    wanted = plan_retention(list(union.values()), policy, now, monitor=monitor).keep
    held = {c.step for c in remote}
    skip = set(unmirrorable)
    return sorted((c.step for c in local if c.step in wanted and c.step not in held and c.step not in skip),
                  reverse=True)
