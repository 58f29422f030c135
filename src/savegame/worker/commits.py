"""What became of the saves: the step last committed, the failures in a row and why the last one
failed; commits and failures are reported to the daemon, and on its own the worker applies retention.

`done` runs on the writer thread; the training thread reads the fields after waiting on the writer.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Callable, Optional

from savegame.config import RunConfig
from savegame.errors import CheckpointExists, StorageError
from savegame.see.history import prune_why, record_prune
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.strategies import plan_retention
from savegame.worker.link import DaemonLink
from savegame.worker.writer import SaveJob

log = logging.getLogger("savegame.worker")
REPORTED_BY_CALLER = ("final", "emergency")  # the training thread waits for these and says what happened


class Commits:
    def __init__(self, link: DaemonLink, on_commit: Callable[[CheckpointInfo], None],
                 persist_s: Callable[[], Optional[float]] = lambda: None) -> None:
        self.step: Optional[int] = None  # the step whose state is committed last
        self.failures = 0  # in a row
        self.error: Optional[BaseException] = None  # why the last save failed (None: it did not)
        self._failed_step: Optional[int] = None  # the step of that failed save
        self._link = link
        self._on_commit = on_commit
        self._persist_s = persist_s  # from handing the save to the writer to its commit

    def done(self, job: SaveJob, info: Optional[CheckpointInfo], error: Optional[BaseException]) -> None:
        if error is not None:
            exists = isinstance(error, CheckpointExists)  # that step is committed already: not a failure
            if exists:
                self._succeeded(job.step)
            else:
                self.failures, self.error, self._failed_step = self.failures + 1, error, job.step
            if exists or job.reason not in REPORTED_BY_CALLER:
                (log.warning if exists else log.error)("checkpoint at step %d not saved: %s", job.step, error)
            self._link.send("save-failed", step=job.step, reason=job.reason, error=str(error))
            return
        assert info is not None
        self._succeeded(info.step)
        self.step = info.step
        log.info("committed step %d (%s) in %s", info.step, info.reason, info.path)
        self._link.send("committed", step=info.step, epoch=info.epoch, reason=info.reason, path=info.path,
                        bytes=info.bytes, metrics=dict(info.metrics), persist_s=self._persist_s())
        self._on_commit(info)


    def committed_by_daemon(self, job: SaveJob, persist_s: float) -> None:
        """The daemon committed a save handed over in shared memory (it reports that commit itself)."""
        self._succeeded(job.step)
        self.step = job.step
        log.info("the daemon committed step %d (%s) in %.3fs", job.step, job.reason, persist_s)

    def _succeeded(self, step: int) -> None:
        """A save of `step` is committed: the failures in a row are over, unless the one that failed
        is newer (an emergency save written here failed while the daemon still committed an older
        hand-over): an older commit does not make that failure good."""
        if self.error is not None and self._failed_step is not None and step < self._failed_step:
            return
        self.failures, self.error, self._failed_step = 0, None, None


def apply_retention(store: CheckpointStore, config: RunConfig, resumed_from: Optional[int]) -> None:
    """Without a daemon the worker keeps what the policy says (never its resume source)."""
    protected = {resumed_from: "resume source"} if resumed_from is not None else {}
    try:
        plan = plan_retention(store.list(), config.retention(), datetime.now(timezone.utc),
                              monitor=config.monitor, protected=protected)  # type: ignore[arg-type]
    except StorageError as exc:
        log.warning("retention skipped: %s", exc)
        return
    for step in plan.delete:
        try:
            store.delete(step)
            record_prune(store, step, "worker", prune_why(config, "local"))
        except StorageError as exc:  # deleted meanwhile by `savegame prune`, say: retention is not training
            log.warning("retention: cannot delete step %d: %s", step, exc)
