"""The run's figures for its metrics: counts from its history (run-wide, across daemons), and one
snapshot of everything the exporter shows, taken by the daemon's loop once a second.

The exporter's threads (the HTTP server) only ever read a finished snapshot (a dict swapped in
whole), so a scrape never sees the loop's state half-changed.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Mapping

from savegame.errors import MalformedInput
from savegame.see import history, jsonl
from savegame.see.goodput import Summary

if TYPE_CHECKING:
    from savegame.daemon.supervisor import Supervisor

log = logging.getLogger("savegame")


class Counts:
    """Commits and failures by reason, prunes by tier, bytes and commit times: the history's totals."""

    def __init__(self) -> None:
        self.committed: collections.Counter[str] = collections.Counter()
        self.failed: collections.Counter[str] = collections.Counter()
        self.pruned: collections.Counter[str] = collections.Counter()
        self.bytes = 0
        self.commit_s = [0, 0.0]  # how many commits were timed, and their seconds in all
        self.last_commit: dict[str, Any] = {}
        self.steps: set[int] = set()  # steps with a commit record
        self._lock = threading.Lock()  # the mirror's thread records its prunes too

    @classmethod
    def of(cls, run_dir: str) -> "Counts":
        counts = cls()
        path = history.history_file(run_dir)
        try:
            counts.add(history.parse_history(jsonl.read(path, history.MAX_HISTORY_BYTES), path))
        except (OSError, MalformedInput) as exc:
            log.warning("cannot read the run's history (%s): its counts start over", exc)
        return counts

    def note(self, entry: Mapping[str, Any]) -> None:
        """One record the daemon is writing (checked like one read back)."""
        self.add(history.parse_history(jsonl.Lines([{**entry, "time": time.time()}]), "a new record"))

    def add(self, h: history.History) -> None:
        with self._lock:
            for c in h.commits:
                self.committed[c.reason or "unknown"] += 1
                self.bytes += c.bytes or 0
                self.steps.add(c.step)
                if c.persist_s is not None:
                    self.commit_s = [self.commit_s[0] + 1, self.commit_s[1] + c.persist_s]
                if c.time >= self.last_commit.get("time", 0):
                    self.last_commit = {"step": c.step, "reason": c.reason, "time": c.time, "bytes": c.bytes}
            for f in h.failed:
                self.failed[f.reason or "unknown"] += 1
            for p in h.prunes:
                self.pruned[p.tier] += 1

    def copy(self) -> dict[str, Any]:
        with self._lock:
            return {"committed": dict(self.committed), "failed": dict(self.failed), "pruned": dict(self.pruned),
                    "bytes": self.bytes, "commit_s": tuple(self.commit_s), "last_commit": dict(self.last_commit)}


def metrics_snapshot(d: "Supervisor", counts: Counts, summary: Summary) -> dict[str, Any]:
    """Every figure the exporter shows, at this moment."""
    mirror = None
    if d.mirror is not None:
        last = d.mirror.last_upload
        lag = max(0.0, (d.last_checkpoint.get("time") or 0) - last[1]) if last else None
        mirror = {"lag_s": lag, "pending": len(d.mirror.pending), "confirmed_step": last[0] if last else None,
                  "missing": len(d.mirror_missing)}
    beat = d.heartbeat
    return {"run": d.run_dir.rstrip("/").rsplit("/", 1)[-1], "run_id": d.run_id, "state": d.machine.state.value,
            "worker_up": bool(d.announced) and d.machine.state.value == "running", "attempt": d.observer.current_attempt,
            "step": beat.get("step"), "steps_per_s": beat.get("steps_per_s"), "mirror": mirror,
            "counts": counts.copy(), "goodput": summary.to_json(),
            "lost_s": summary.seconds["redone"], "stall_s": summary.seconds["stalls"]}
