"""Local retention under the daemon: the configured policy, plus what must survive for now."""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Optional

from savegame.config import RunConfig
from savegame.errors import StorageError
from savegame.storage import CheckpointStore
from savegame.strategies import plan_retention

log = logging.getLogger("savegame")


def prune_local(local: CheckpointStore, config: RunConfig, resume_step: Optional[int],
                deletable_by_mirror: Optional[set[int]]) -> dict[int, str]:
    """Delete local checkpoints the policy does not keep. Never the resume source, and, with a
    mirror, never one the mirror has not confirmed (or declined). Returns what it protected."""
    checkpoints = local.list()
    protected = {}
    if resume_step is not None:
        protected[resume_step] = "resume source"
    if deletable_by_mirror is not None:
        protected.update({c.step: "not yet mirrored" for c in checkpoints if c.step not in deletable_by_mirror})
    plan = plan_retention(checkpoints, config.retention("local"), datetime.now(timezone.utc),
                          monitor=config.monitor, protected=protected)  # type: ignore[arg-type]
    deleted = []
    for step in plan.delete:
        try:
            local.delete(step)
            deleted.append(step)
        except StorageError as exc:
            log.warning("retention: cannot delete step %d: %s", step, exc)
    if deleted:
        log.info("retention (%s): deleted local steps %s", config.regime, deleted)
    return protected
