"""The run's failure record, for the adaptive save interval's MTBF (`every_seconds = "auto"`).

`.savegame/reliability.json` in the run folder: how long workers ran in all, and how many times
they were interrupted, by cause. Preemptions count (from a notice, the scheduler's signal, or a
worker's own exit 75); a plain stop (`systemctl stop`, SIGTERM from a person) does not, nor do
rollbacks or failures to start. It survives daemon restarts on the same machine; a fresh VM starts
over from the prior. Each worker gets the totals at its start in `SAVEGAME_RELIABILITY`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

from savegame.daemon.status import STATUS_DIR, read_json_file, write_json_file

log = logging.getLogger("savegame")
RECORD_FILE = "reliability.json"
COUNTED = ("crash", "killed", "hang", "preempted", "bad-checkpoint", "save-failed")


class ReliabilityRecord:
    def __init__(self, run_dir: str) -> None:
        self.path = os.path.join(run_dir, STATUS_DIR, RECORD_FILE)
        data = read_json_file(self.path) or {}
        observed, failures = data.get("observed_s"), data.get("failures")
        self.observed_s = float(observed) if _number(observed) else 0.0
        self.failures: dict[str, int] = ({k: v for k, v in failures.items() if k in COUNTED and _count(v)}
                                         if isinstance(failures, dict) else {})
        self._since: Optional[float] = None  # monotonic start of the running worker

    @property
    def total_failures(self) -> int:
        return sum(self.failures.values())

    def for_worker(self) -> str:
        """What a starting worker is told (SAVEGAME_RELIABILITY)."""
        return json.dumps({"failures": self.total_failures, "observed_s": round(self.observed_s, 3)})

    def started(self) -> None:
        self._since = time.monotonic()

    def ended(self, cause: Optional[str]) -> None:
        """The worker is gone; `cause` is why, when it counts as an interruption."""
        if self._since is not None:
            self.observed_s += max(0.0, time.monotonic() - self._since)
            self._since = None
        if cause in COUNTED:
            self.failures[cause] = self.failures.get(cause, 0) + 1  # type: ignore[index]
        self._save()

    def preempted(self) -> None:
        """A notice or the scheduler's signal: the machine is being taken away (once per daemon)."""
        self.failures["preempted"] = self.failures.get("preempted", 0) + 1
        self._save()

    def _save(self) -> None:
        try:
            write_json_file(self.path, {"format": 1, "observed_s": self.observed_s, "failures": self.failures})
        except OSError as exc:  # a full disk must not take the supervisor down
            log.warning("cannot record the run's failures: %s", exc)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
