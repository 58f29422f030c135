"""Mirroring committed local checkpoints to object storage, off the worker's critical path.

One thread owns the remote store: it uploads what the remote lacks (the emergency checkpoint
first, then newest first), retries with backoff, applies the remote retention, and reports which
steps the remote holds. The local tier never deletes a checkpoint the remote has not confirmed.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TypeVar

from savegame.errors import CheckpointExists, CorruptCheckpoint, StorageError
from savegame.storage import CheckpointInfo, CheckpointStore, copy_checkpoint
from savegame.strategies import plan_retention
from savegame.strategies.retention import RetentionPolicy

log = logging.getLogger("savegame")
T = TypeVar("T")
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0


class Mirror:
    def __init__(self, local: CheckpointStore, remote: CheckpointStore, policy: RetentionPolicy,
                 monitor: Optional[tuple[str, str]], wake: Callable[[], None], stale_after_s: float,
                 op_timeout_s: float = 600.0) -> None:
        self._op_timeout_s = op_timeout_s
        self._abandoned: list[tuple[Optional[int], threading.Thread]] = []  # (step it writes, thread)
        self.local = local
        self.remote = remote
        self._policy = policy
        self._monitor = monitor
        self._wake = wake
        self._stale_after_s = stale_after_s
        self._cond = threading.Condition()
        self._urgent: Optional[int] = None
        self._requested = True
        self._closing = False
        self._remote_infos: Optional[dict[int, CheckpointInfo]] = None
        self._skip: set[int] = set()  # steps the mirror cannot take: damaged here, or different there
        self.pending: list[int] = []
        self.declined: set[int] = set()  # local steps the remote policy does not want
        self._pruned: set[int] = set()  # steps the remote had and let go
        self.last_error: Optional[str] = None
        self.last_upload: Optional[tuple[int, float]] = None  # (step, wall time)
        self._busy = False
        self._thread = threading.Thread(target=self._loop, name="savegame-mirror", daemon=True)

    def set_policy(self, policy: RetentionPolicy, monitor: Optional[tuple[str, str]]) -> None:
        with self._cond:
            self._policy, self._monitor = policy, monitor
            self._requested = True
            self._cond.notify()

    def start(self) -> None:
        self._thread.start()

    # -- the loop thread's side -------------------------------------------------------------

    def request_sync(self, urgent_step: Optional[int] = None) -> None:
        with self._cond:
            self._requested = True
            if urgent_step is not None:
                self._urgent = urgent_step
            self._cond.notify()

    def remote_listing(self) -> list[CheckpointInfo]:
        with self._cond:
            return sorted((self._remote_infos or {}).values(), key=lambda c: c.step)

    def flush(self, timeout_s: float) -> bool:
        """Wait until nothing is left to upload (or the timeout passes); True if all is mirrored."""
        deadline = time.monotonic() + timeout_s
        self.request_sync()
        with self._cond:
            while self._requested or self._busy or self.pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    # -- the mirror thread ------------------------------------------------------------------

    def _loop(self) -> None:
        retry_s = RETRY_INITIAL_S
        while True:
            with self._cond:
                while not self._requested and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._requested, self._busy = False, True
            try:
                self._sync()
                self.last_error, retry_s = None, RETRY_INITIAL_S
            except Exception as exc:  # noqa: BLE001 - the mirror thread must never die quietly
                self.last_error = str(exc)
                with self._cond:
                    self._remote_infos = None  # an abandoned operation may still land: list again
                log.warning("mirror to %s failed (%s); retrying in %.1fs", self.remote.url, exc, retry_s)
                self._sleep_then_retry(retry_s)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                self._wake()

    def _sleep_then_retry(self, seconds: float) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._closing, timeout=seconds)
            self._requested = True

    def _sync(self) -> None:
        if self._abandoned:  # operations given up on may have landed since: trust only a fresh listing
            self._abandoned = [(step, t) for step, t in self._abandoned if t.is_alive()]
            with self._cond:
                self._remote_infos = None
        # An abandoned upload still running must finish (or fail) alone: a second upload of the same
        # step could delete its files while it commits them.
        busy = {step for step, _ in self._abandoned}
        if self._remote_infos is None:
            infos = {c.step: c for c in self._timed(self.remote.list, "listing")}
            with self._cond:
                self._remote_infos = infos
            self._timed(lambda: self.remote.collect_garbage(self._stale_after_s), "collecting stale uploads")
        local = {c.step: c for c in self.local.list() if c.step not in self._skip}
        wanted = self._wanted({**local, **(self._remote_infos or {})})
        with self._cond:
            urgent, self._urgent = self._urgent, None
            remote = self._remote_infos or {}
            missing = sorted((s for s in local if s not in remote and s in wanted and s not in busy),
                             key=lambda s: (s != urgent, -s))
            self.declined = {s for s in local if s not in remote and s not in wanted}
            self.pending = missing
        for step in missing:
            self._upload(local[step])
            with self._cond:
                self.pending = [s for s in self.pending if s != step]
            self._wake()
        self._prune_remote()

    def _wanted(self, union: dict[int, CheckpointInfo]) -> set[int]:
        """The steps the remote policy keeps, judged over everything either tier holds."""
        plan = plan_retention(list(union.values()), self._policy, datetime.now(timezone.utc),
                              monitor=self._monitor)  # type: ignore[arg-type]
        return set(plan.keep)

    def unprotected_steps(self) -> set[int]:
        """Local steps the local tier may delete: the remote holds them, or does not want them."""
        with self._cond:
            return set(self._remote_infos or {}) | self.declined | self._pruned | self._skip

    def _timed(self, operation: Callable[[], T], what: str, step: Optional[int] = None) -> T:
        """Run one remote operation with a deadline. Client timeouts do not cover every stall (a server
        that accepts connections but never answers), so the operation runs in a helper thread; one
        that overruns is abandoned (it finishes or fails on its own) and the sync is retried later."""
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["value"] = operation()
            except BaseException as exc:  # handed back to the mirror thread below
                outcome["error"] = exc

        helper = threading.Thread(target=call, name="savegame-mirror-op", daemon=True)
        helper.start()
        helper.join(self._op_timeout_s)
        if helper.is_alive():
            self._abandoned.append((step, helper))
            raise StorageError(f"{self.remote.url}: {what} took longer than {self._op_timeout_s:g}s")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _upload(self, info: CheckpointInfo) -> None:
        started = time.monotonic()
        try:
            copied = self._timed(lambda: copy_checkpoint(self.local, info, self.remote), f"uploading step {info.step}",
                                 step=info.step)
        except CheckpointExists:  # an earlier attempt committed it, or the step holds something else
            copied = self._same_on_remote(info)
            if copied is None:
                return
        except CorruptCheckpoint as exc:
            log.error("not mirroring step %d, it is damaged: %s", info.step, exc)
            self._skip.add(info.step)
            try:
                self.local.quarantine(info.step, f"damaged, found while mirroring: {exc}")
            except StorageError as error:
                log.error("cannot quarantine step %d: %s", info.step, error)
            return
        with self._cond:
            assert self._remote_infos is not None
            self._remote_infos[info.step] = copied
        self.last_upload = (info.step, time.time())
        log.info("mirrored step %d to %s in %.1fs", info.step, self.remote.url, time.monotonic() - started)

    def _same_on_remote(self, info: CheckpointInfo) -> Optional[CheckpointInfo]:
        """The remote checkpoint at this step if it is this very checkpoint, else None (and never again)."""
        remote = {c.step: c for c in self._timed(self.remote.list, "listing")}.get(info.step)
        if remote is not None and (remote.manifest.created, remote.manifest.files) == \
                (info.manifest.created, info.manifest.files):
            return remote
        why = "is quarantined" if remote is None else "holds a different checkpoint (another timeline)"
        log.error("not mirroring step %d: the bucket's step %d %s; local retention decides on it alone",
                  info.step, info.step, why)
        self._skip.add(info.step)
        return None

    def _prune_remote(self) -> None:
        listing = self.remote_listing()
        plan = plan_retention(listing, self._policy, datetime.now(timezone.utc),
                              monitor=self._monitor)  # type: ignore[arg-type]
        for step in plan.delete:
            self._timed(lambda: self.remote.delete(step), f"deleting step {step}")
            with self._cond:
                assert self._remote_infos is not None
                self._remote_infos.pop(step, None)
                self._pruned.add(step)  # the remote does not want it: the local tier may let it go
            log.info("mirror retention: deleted step %d from %s", step, self.remote.url)
