"""Choosing the checkpoint a (re)started worker resumes from, safely.

Candidates come from the local folder and the mirror (a fresh machine has only the mirror),
ordered by the resume choice. The first one that verifies is used: a damaged one is quarantined,
never deleted, and the one before it is tried. One on the mirror only is downloaded first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from savegame.errors import CheckpointExists, CorruptCheckpoint, StorageError
from savegame.storage import CheckpointInfo, CheckpointStore, copy_checkpoint
from savegame.strategies import resume_candidates

log = logging.getLogger("savegame")


@dataclass(frozen=True)
class ResumePoint:
    info: CheckpointInfo  # in the local store
    source: str  # "local" or the mirror's URL


class ResumeChooser:
    def __init__(self, local: CheckpointStore, remote: Optional[CheckpointStore],
                 monitor: Optional[tuple[str, str]]) -> None:
        self.local = local
        self.remote = remote
        self.monitor = monitor
        self._verified: set[tuple[int, str]] = set()  # (step, created): verified once per daemon

    def choose(self, choice: str, exclude: Iterable[int] = ()) -> Optional[ResumePoint]:
        """The latest (or best) valid checkpoint, leaving out the steps in `exclude`."""
        local = {c.step: c for c in self.local.list()}
        remote = {c.step: c for c in self._remote_list()}
        merged = {**remote, **local}
        metric, mode = self.monitor or (None, "max")
        skipped = set(exclude)
        for info in resume_candidates(list(merged.values()), choice, metric, mode):  # type: ignore[arg-type]
            if info.step in skipped:
                continue
            point = self._usable(info, local.get(info.step), remote.get(info.step))
            if point is not None:
                return point
        return None

    def _remote_list(self) -> list[CheckpointInfo]:
        if self.remote is None:
            return []
        try:
            return self.remote.list()
        except StorageError as exc:
            log.warning("cannot list the mirror %s (%s); choosing among local checkpoints only", self.remote.url, exc)
            return []

    def _usable(self, info: CheckpointInfo, local: Optional[CheckpointInfo],
                remote: Optional[CheckpointInfo]) -> Optional[ResumePoint]:
        if local is not None:
            if self._verify_local(local):
                return ResumePoint(local, "local")
            self.quarantine(local.step, "failed verification before resume")
        if remote is not None and self.remote is not None:
            return self._download(remote)
        return None

    def _verify_local(self, info: CheckpointInfo) -> bool:
        key = (info.step, info.manifest.created)
        if key in self._verified:
            return True
        problems = self.local.verify(info)
        if problems:
            log.error("step %d in %s is damaged: %s", info.step, self.local.url, "; ".join(problems))
            return False
        self._verified.add(key)
        return True

    def _download(self, info: CheckpointInfo) -> Optional[ResumePoint]:
        assert self.remote is not None
        log.info("fetching step %d from the mirror %s", info.step, self.remote.url)
        try:
            copied = copy_checkpoint(self.remote, info, self.local)
        except CheckpointExists:
            copied = self.local.get(info.step)
        except CorruptCheckpoint as exc:
            log.error("step %d on the mirror is damaged (%s): quarantined", info.step, exc)
            self.remote.quarantine(info.step, str(exc))
            return None
        except StorageError as exc:
            log.error("cannot fetch step %d from the mirror: %s", info.step, exc)
            return None
        self._verified.add((copied.step, copied.manifest.created))
        return ResumePoint(copied, self.remote.url)

    def quarantine(self, step: int, why: str) -> None:
        """Set a damaged local checkpoint aside; it is kept for inspection, never resumed from."""
        try:
            self.local.quarantine(step, why)
            log.error("quarantined step %d in %s: %s", step, self.local.url, why)
        except StorageError as exc:
            log.error("cannot quarantine step %d: %s", step, exc)
