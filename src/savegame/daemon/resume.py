"""Choosing the checkpoint a (re)started worker resumes from, safely.

Candidates come from the local folder and the mirror (a fresh machine has only the mirror),
ordered by the resume choice. The first one that verifies is used: a damaged one is quarantined,
never deleted, and the one before it is tried. One on the mirror only is downloaded first (a
damaged local folder at its step is quarantined to make room). The mirror is asked with a
deadline: a slow bucket never delays a resume that local checkpoints can serve, and when the
bucket cannot be read and nothing local can serve either, the caller hears so (MirrorUnreachable)
instead of a fresh start that would fork the run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Optional

from savegame.daemon.deadline import with_deadline
from savegame.errors import CheckpointExists, ConfigError, CorruptCheckpoint, StorageError
from savegame.storage import CheckpointInfo, CheckpointStore, copy_checkpoint
from savegame.strategies import resume_candidates

log = logging.getLogger("savegame")
LIST_TIMEOUT_S = 15.0  # how long to wait for the bucket when only it can serve the resume
QUICK_LIST_S = 3.0  # ... and when local checkpoints could serve it: a slow bucket must not hold it up


class MirrorUnreachable(StorageError):
    """The mirror cannot be listed, and no local checkpoint can serve the resume."""


@dataclass(frozen=True)
class ResumePoint:
    info: CheckpointInfo  # in the local store
    source: str  # "local" or the mirror's URL


class ResumeChooser:
    def __init__(self, local: CheckpointStore, remote: Optional[CheckpointStore],
                 monitor: Optional[tuple[str, str]], download_timeout_s: float = 600.0,
                 list_timeout_s: float = LIST_TIMEOUT_S) -> None:
        self.local = local
        self.remote = remote
        self.monitor = monitor
        self._download_timeout_s = download_timeout_s
        self._list_timeout_s = min(list_timeout_s, download_timeout_s)
        self._verified: set[tuple[int, str]] = set()  # (step, created): verified once per daemon

    def choose(self, choice: str, exclude: Iterable[int] = (), before: Optional[int] = None) -> Optional[ResumePoint]:
        """The latest (or best) valid checkpoint, leaving out the steps in `exclude` (and from `before` on)."""
        skipped = set(exclude)
        local = {c.step: c for c in self.local.list() if c.step not in skipped and (before is None or c.step < before)}
        remote, problem = self._remote_list(QUICK_LIST_S if local else self._list_timeout_s)
        if problem is not None:
            if not local:
                raise MirrorUnreachable(f"cannot list the mirror {self.remote.url if self.remote else ''} "
                                        f"({problem}) and the run folder holds no checkpoint to resume from")
            log.warning("cannot list the mirror %s (%s); choosing among local checkpoints only",
                        self.remote.url if self.remote else "", problem)
        merged = {**{s: c for s, c in remote.items() if s not in skipped and (before is None or s < before)}, **local}
        if not merged:
            return None
        if choice == "best" and self.monitor is None:
            raise ConfigError("resume = 'best' needs a monitored metric, and this run's is not known (no stored "
                              "policy, no --monitor): give --monitor NAME (and --mode), or resume the latest")
        metric, mode = self.monitor or (None, "max")
        for info in resume_candidates(list(merged.values()), choice, metric, mode):  # type: ignore[arg-type]
            point = self._usable(info, local.get(info.step), remote.get(info.step))
            if point is not None:
                return point
        return None

    def _remote_list(self, timeout_s: float) -> tuple[dict[int, CheckpointInfo], Optional[str]]:
        if self.remote is None:
            return {}, None
        remote = self.remote
        try:
            listing = with_deadline(remote.list, timeout_s, f"listing {remote.url}")
        except StorageError as exc:
            return {}, str(exc.strerror or exc)
        return {c.step: c for c in listing}, None

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
        remote = self.remote
        self._make_room(info.step)
        log.info("fetching step %d from the mirror %s", info.step, remote.url)
        try:
            copied = with_deadline(lambda: copy_checkpoint(remote, info, self.local), self._download_timeout_s,
                                   f"fetching step {info.step} from {remote.url}")
        except CheckpointExists:  # fetched before (by an earlier attempt of this daemon)
            try:
                copied = self.local.get(info.step)
            except StorageError as exc:
                log.error("cannot use step %d: %s", info.step, exc)
                return None
        except CorruptCheckpoint as exc:
            log.error("step %d on the mirror is damaged (%s): quarantined", info.step, exc)
            remote.quarantine(info.step, str(exc))
            return None
        except StorageError as exc:
            log.error("cannot fetch step %d from the mirror: %s", info.step, exc)
            return None
        self._verified.add((copied.step, copied.manifest.created))
        return ResumePoint(copied, remote.url)

    def _make_room(self, step: int) -> None:
        """A damaged local folder at this step (an unreadable manifest, say) is moved aside, kept for
        inspection, so the good copy from the mirror can take its place."""
        scan = self.local.scan()
        for problem in scan.damaged:
            if problem.step == step:
                self.quarantine(step, f"damaged ({problem.problem}); a good copy comes from the mirror")

    def quarantine(self, step: int, why: str) -> None:
        """Set a damaged local checkpoint aside; it is kept for inspection, never resumed from."""
        try:
            self.local.quarantine(step, why)
            log.error("quarantined step %d in %s: %s", step, self.local.url, why)
        except StorageError as exc:
            log.error("cannot quarantine step %d: %s", step, exc)
