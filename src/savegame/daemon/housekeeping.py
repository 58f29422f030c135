"""The daemon's periodic work: the watchdog, local retention, garbage collection, the status file.

Local retention runs only once the run's policy is known, and never deletes the resume source or a
checkpoint the bucket still needs (strategies/tiers.py decides which; plan_retention keeps the
newest and the best whatever the policy says).
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

from savegame.daemon.status import write_status
from savegame.errors import StorageError
from savegame.strategies import plan_retention

if TYPE_CHECKING:
    from savegame.daemon.supervisor import Supervisor

log = logging.getLogger("savegame")
STATUS_INTERVAL_S = 1.0


class Housekeeping:
    def __init__(self, daemon: "Supervisor") -> None:
        self.daemon = daemon
        self.dirty = True  # something changed: retention looks again
        self.watchdog_at = 0.0
        self.protected: dict[int, str] = {}  # what local retention keeps for now, and why
        self._status_at = 0.0
        self._status_error_logged = False

    def tick(self) -> None:
        d = self.daemon
        now = time.monotonic()
        due = d.notifier.watchdog_interval_s and now - self.watchdog_at >= d.notifier.watchdog_interval_s
        if due and d.exit_code is None:  # once the run is over, its final STATUS= is the last message
            d.notifier.watchdog()
            self.watchdog_at = now
        if self.dirty and d.exit_code is None:
            self.dirty = False
            self.prune_local()
        if now - self._status_at >= STATUS_INTERVAL_S:
            self.write_status()

    def collect_garbage(self) -> None:
        d = self.daemon
        try:
            for path in d.local.collect_garbage(d.config["stale_after"]):
                log.info("removed the leftovers of an unfinished save: %s", path)
        except StorageError as exc:
            log.warning("cannot collect stale staging: %s", exc)

    def prune_local(self) -> None:
        """Delete local checkpoints the policy does not keep: never the resume source, never one the
        bucket still needs, and nothing at all while the run's policy is unknown."""
        d = self.daemon
        if not d.startup.policy_known or not d.is_leader:
            return  # unknown policy: nothing is deleted; of several nodes, the leader decides
        try:
            checkpoints = d.local.list()
            protected = {}
            if d.resume_point is not None and not d.resume_superseded:
                protected[d.resume_point.info.step] = "resume source"  # until the worker commits past it
            if d.mirror is not None:
                protected.update({s: "not yet mirrored" for s in d.mirror.awaiting(checkpoints)})
                protected.update({s: "being uploaded" for s in d.mirror.reading()})
            plan = plan_retention(checkpoints, d.config.retention("local"), datetime.now(timezone.utc),
                                  monitor=d.config.monitor, protected=protected)  # type: ignore[arg-type]
        except StorageError as exc:
            log.warning("retention skipped: %s", exc)
            return
        self.protected = protected
        deleted = []
        for step in plan.delete:
            try:
                d.local.delete(step)
                deleted.append(step)
            except StorageError as exc:
                log.warning("retention: cannot delete step %d: %s", step, exc)
        if deleted:
            log.info("retention (%s): deleted local steps %s", d.config.regime, deleted)
        d.observer.retention(checkpoints, deleted, d.config)

    def write_status(self, reason: Optional[str] = None) -> None:
        d = self.daemon
        self._status_at = time.monotonic()
        if reason:
            d.reason = reason
        try:
            write_status(d.run_dir, self._status(), d.node.file("status.json"))
            self._status_error_logged = False
        except OSError as exc:  # a full disk must not take the supervisor down
            if not self._status_error_logged:
                log.warning("cannot write the status file: %s", exc)
                self._status_error_logged = True

    def _status(self) -> dict:
        d = self.daemon
        mirror = None
        if d.mirror is not None and d.remote is not None:
            last = d.mirror.last_upload
            lag = max(0.0, (d.last_checkpoint.get("time") or 0) - last[1]) if last else None
            mirror = {"url": d.remote.url, "pending": len(d.mirror.pending), "error": d.mirror.last_error,
                      "confirmed_step": last[0] if last else None, "lag_s": lag, "missing": d.mirror_missing}
        return {
            "state": d.machine.state.value, "reason": d.reason, "daemon_pid": os.getpid(),
            "worker_pid": d.worker.pid if d.worker else None, "worker_ready": bool(d.announced),
            "attempt": d.attempt, "run_id": d.run_id, "restarts": dict(d.restarts),
            "resumed_from": d.resume_point.info.step if d.resume_point else None,
            "last_checkpoint": d.last_checkpoint, "heartbeat": d.heartbeat, "mirror": mirror,
            "hang_timeout_s": d.hang.timeout_s,
            "policy": _policy_summary(d), "policy_known": d.startup.policy_known,
            "protected": {str(step): why for step, why in self.protected.items()},
            "events_dropped": dict(d.inbox.dropped), **d.observer.status_or_nothing(), **_job(d)}


def _job(d: "Supervisor") -> dict:
    """The job's world size and this node's ranks (nothing for one process)."""
    job = d.ranks.summary()
    node = {"node": d.node.name, "leader": d.is_leader} if d.node.name else {}
    return {**({"job": job} if job else {}), **node}


def _policy_summary(d: "Supervisor") -> dict:
    """The effective policy, for `savegame status` (never the storage options)."""
    values = d.config.values
    return {"regime": values["regime"], "monitor": values.get("monitor"), "mode": values.get("mode"),
            "resume": values["resume"], "keep": values["keep"], "mirror_keep": values["mirror_keep"],
            "save": values["save"]}
