"""Mirroring committed local checkpoints to object storage, off the worker's critical path.

One thread owns the remote store. A pass lists the bucket when its view may be stale, stores the
run's policy beside the checkpoints once it is known, then uploads what the bucket's policy wants
and the bucket lacks, one checkpoint at a time, choosing again before every upload: emergency and
final checkpoints first (an upload of another step in flight is cancelled for them at once), then
newest first. Every remote operation has a deadline; one that overruns is abandoned, and the view
is listed again before anything relies on it. The bucket's retention runs only once the run's
policy is known. `flush` returns the steps the bucket still lacks: "mirrored" is never assumed.
After a pass that changed the bucket (and once per daemon), the manifest index is rewritten from a
fresh listing (storage/manifestindex.py), so cold listings of the bucket read one object.
"""
from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Optional, TypeVar

from savegame.config import RunConfig
from savegame.daemon.deadline import Abandoned, call_with_deadline
from savegame.errors import CheckpointExists, CorruptCheckpoint, StorageError
from savegame.policy import policy_record, write_policy
from savegame.storage import CheckpointInfo, CheckpointStore, copy_checkpoint
from savegame.strategies import plan_retention
from savegame.strategies.tiers import awaiting_upload

log = logging.getLogger("savegame")
T = TypeVar("T")
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 30.0
FLUSH_RETRY_S = 0.5  # while the daemon waits for the bucket, a failed pass is retried this soon
INDEX_FLUSH_S = 5.0  # how long a flush waits for the manifest index once every checkpoint is there
CALL_TIMEOUT_S = 30.0  # listing, deleting, small writes: a stalled server must not hold anything up


class _Preempted(Exception):
    """An upload was set aside for an emergency or final checkpoint."""


class Mirror:
    def __init__(self, local: CheckpointStore, remote: CheckpointStore, wake: Callable[[], None],
                 stale_after_s: float, upload_timeout_s: float = 600.0,
                 call_timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.local = local
        self.remote = remote
        self._wake = wake
        self._stale_after_s = stale_after_s
        self._upload_timeout_s = upload_timeout_s
        self._call_timeout_s = min(call_timeout_s, upload_timeout_s)
        self._cond = threading.Condition()
        self._config: Optional[RunConfig] = None  # None: the run's policy is not known yet
        self._stored_policy: Optional[dict[str, Any]] = None  # the record the bucket holds
        self._urgent: set[int] = set()
        self._requested = True
        self._retry_now = False  # cut the current backoff short (an urgent step, a flush beginning)
        self._flushing = False  # the daemon waits for the bucket: failed passes are retried quickly
        self._closing = False
        self._busy = False
        self._remote: dict[int, CheckpointInfo] = {}  # what the bucket holds, as last listed
        self._listed = False  # `_remote` is a listing made since the last doubt
        self._skip: set[int] = set()  # steps the bucket cannot take: damaged here, or different there
        self._abandoned: list[tuple[Optional[int], threading.Thread]] = []  # (step it writes, thread)
        self.pending: list[int] = []  # what it still has to upload, newest first
        self._uploading: Optional[int] = None  # the step being read right now
        self.last_error: Optional[str] = None
        self.last_upload: Optional[tuple[int, float]] = None  # (step, wall time)
        self._index_stale = True  # the bucket changed since the manifest index was last written
        self.on_pruned: Callable[[int], None] = lambda step: None  # the run's history notes what retention deleted
        self.records: Optional[Callable[[CheckpointStore], None]] = None  # copies the run's history beside them
        self._thread = threading.Thread(target=self._loop, name="savegame-mirror", daemon=True)

    # -- the daemon's side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def set_config(self, config: RunConfig) -> None:
        """The run's policy is known (or changed): the bucket's retention may run, and gets it stored."""
        with self._cond:
            self._config = config
            self._requested = True
            self._cond.notify_all()

    def forget(self) -> None:
        """The bucket changed behind the mirror's back (the daemon set steps aside there): list it again
        before anything relies on what it holds."""
        with self._cond:
            self._listed = False
            self._remote = {}
            self._requested = True
            self._cond.notify_all()

    def request_sync(self, urgent_step: Optional[int] = None) -> None:
        """Look again; an `urgent_step` (emergency, final) goes before anything else, at once."""
        with self._cond:
            self._requested = True
            if urgent_step is not None:
                self._urgent.add(urgent_step)
                self._retry_now = True
            self._cond.notify_all()

    def awaiting(self, local: list[CheckpointInfo]) -> list[int]:
        """Local steps the bucket still needs (the local tier keeps them); all of them while the
        run's policy is unknown."""
        with self._cond:
            config, remote = self._config, list(self._remote.values())
            skip = set(self._skip)
        if config is None:
            return sorted((c.step for c in local if c.step not in self._remote and c.step not in skip), reverse=True)
        return awaiting_upload(local, remote, config.retention("mirror"), datetime.now(timezone.utc),
                               monitor=config.monitor, unmirrorable=skip)  # type: ignore[arg-type]

    def reading(self) -> set[int]:
        """Local steps an upload is reading (the current one, and abandoned ones still running): local
        retention must not delete them under it."""
        with self._cond:
            steps = {step for step, thread in self._abandoned if thread.is_alive() and step is not None}
            return steps | ({self._uploading} if self._uploading is not None else set())

    def missing(self) -> list[int]:
        """Local steps the bucket's policy wants and the bucket does not hold, those it cannot take (its
        step there holds something else) included: the truth for the daemon's exit."""
        with self._cond:
            config, remote = self._config, list(self._remote.values())
        local = self.local.list()
        if config is None:
            return sorted((c.step for c in local if c.step not in self._remote), reverse=True)
        return awaiting_upload(local, remote, config.retention("mirror"), datetime.now(timezone.utc),
                               monitor=config.monitor)  # type: ignore[arg-type]

    def flush(self, timeout_s: float) -> list[int]:
        """Wait until the bucket holds everything it should (or the timeout passes); the steps it
        still lacks (empty: all mirrored). An empty answer is never a guess: it is judged against
        the bucket as listed, and a step whose upload was abandoned counts as missing."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing = self._retry_now = self._requested = True
            self._cond.notify_all()
        settle_by: Optional[float] = None  # once all is there, the index may catch up until then
        while True:
            missing, now = self.awaiting(self.local.list()), time.monotonic()
            settle_by = None if missing else (settle_by or now + INDEX_FLUSH_S)
            with self._cond:
                indexed = not self._index_stale  # it only saves reads: waited for briefly, never required
            if now >= deadline or (settle_by is not None and (indexed or now >= settle_by)):
                return missing
            with self._cond:
                self._requested = True  # a pass starts as soon as the thread is free
                self._cond.notify_all()
                self._cond.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    # -- the mirror thread -------------------------------------------------------------------------

    def _loop(self) -> None:
        retry_s = RETRY_INITIAL_S
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._requested or self._closing)
                if self._closing:
                    return
                self._requested, self._busy = False, True
            try:
                self._sync()
                self.last_error, retry_s = None, RETRY_INITIAL_S
            except Exception as exc:  # noqa: BLE001 - the mirror thread must never die quietly
                self.last_error = str(exc)
                with self._cond:
                    self._listed = False  # an abandoned or failed operation may still land: list again
                rest = FLUSH_RETRY_S if self._flushing else retry_s
                log.warning("mirror to %s failed (%s); retrying in %.1fs", self.remote.url, exc, rest)
                self._rest(rest)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                self._wake()

    def _rest(self, seconds: float) -> None:
        """Back off after a failure; a stop, a flush or an urgent checkpoint cuts the rest short."""
        with self._cond:
            self._cond.wait_for(lambda: self._closing or self._retry_now, timeout=seconds)
            self._retry_now = False
            self._requested = True

    def _sync(self) -> None:
        self._reap_abandoned()
        if not self._listed:
            infos = self._timed(self.remote.list, "listing")
            with self._cond:
                self._remote, self._listed = {c.step: c for c in infos}, True
            self._timed(lambda: self.remote.collect_garbage(self._stale_after_s), "collecting stale uploads")
        self._store_policy()
        while (info := self._next_upload()) is not None:
            try:
                self._upload(info)
            except _Preempted:
                continue  # the urgent step is chosen next
            self._wake()
        self._prune_remote()
        if self._index_stale:
            self._store_records()
            self._timed(self.remote.write_index, "writing the manifest index")
            with self._cond:
                self._index_stale = False

    def _next_upload(self) -> Optional[CheckpointInfo]:
        local = {c.step: c for c in self.local.list()}
        awaiting = self.awaiting(list(local.values()))
        with self._cond:
            busy = {step for step, thread in self._abandoned if thread.is_alive()}
            self.pending = awaiting
            todo = [s for s in awaiting if s not in busy]
            urgent = [s for s in todo if s in self._urgent]
            step = urgent[0] if urgent else (todo[0] if todo else None)
            self._uploading = step  # chosen under the lock local retention asks (reading())
        return None if step is None else local[step]

    def _urgent_waiting(self, besides: Optional[int]) -> bool:
        with self._cond:
            return any(s != besides and s not in self._remote for s in self._urgent)

    def _reap_abandoned(self) -> None:
        with self._cond:
            finished = [entry for entry in self._abandoned if not entry[1].is_alive()]
            if finished:
                self._abandoned = [entry for entry in self._abandoned if entry[1].is_alive()]
                self._listed = False  # what they did (or not) shows only in a fresh listing

    def _timed(self, operation: Callable[[], T], what: str) -> T:
        """One small remote operation with a deadline (an overrun is abandoned, the view listed again)."""
        return self._deadlined(lambda cancelled: operation(), what, None, self._call_timeout_s, urgent=True)

    def _deadlined(self, operation: Callable[[Callable[[], bool]], T], what: str, step: Optional[int],
                   timeout_s: float, urgent: bool) -> T:
        """`operation(cancelled)` with a deadline. One that is not `urgent` is also set aside, and told
        to stop, as soon as an urgent step waits."""
        try:
            return call_with_deadline(operation, timeout_s, f"{self.remote.url}: {what}",
                                      set_aside=(lambda: False) if urgent else (lambda: self._urgent_waiting(step)))
        except Abandoned as exc:
            with self._cond:
                self._abandoned.append((step, exc.thread))
            if exc.set_aside:
                raise _Preempted() from None
            raise

    def _store_policy(self) -> None:
        with self._cond:
            config = self._config
        if config is None:
            return
        record = policy_record(config)
        if record != self._stored_policy:
            self._timed(lambda: write_policy(self.remote, config), "storing the run's policy")
            self._stored_policy = record

    def _upload(self, info: CheckpointInfo) -> None:
        """Upload one step (`_next_upload` marked it as being read: local retention leaves it alone)."""
        try:
            self._copy_up(info)
        finally:
            with self._cond:
                self._uploading = None

    def _copy_up(self, info: CheckpointInfo) -> None:
        started = time.monotonic()
        urgent = info.step in self._urgent
        try:
            copied = self._deadlined(lambda cancelled: copy_checkpoint(self.local, info, self.remote, cancelled=cancelled),
                                     f"uploading step {info.step}", info.step, self._upload_timeout_s, urgent)
        except CheckpointExists:  # an earlier attempt committed it, or the step holds something else
            copied = self._same_on_remote(info)
            if copied is None:
                return
        except CorruptCheckpoint as exc:
            self._unmirrorable(info.step, f"damaged, found while mirroring: {exc}")
            return
        except _Preempted:
            log.info("mirror: setting step %d aside for an urgent checkpoint", info.step)
            raise
        with self._cond:
            self._remote[info.step] = copied
            self._index_stale = True
        self.last_upload = (info.step, time.time())
        log.info("mirrored step %d to %s in %.1fs", info.step, self.remote.url, time.monotonic() - started)

    def _unmirrorable(self, step: int, why: str) -> None:
        log.error("not mirroring step %d: %s", step, why)
        with self._cond:
            self._skip.add(step)
        try:
            self.local.quarantine(step, why)
        except StorageError as error:
            log.error("cannot quarantine step %d: %s", step, error)

    def _same_on_remote(self, info: CheckpointInfo) -> Optional[CheckpointInfo]:
        """The remote checkpoint at this step if it is this very checkpoint; None (and never again) when
        the step there holds another one or a quarantined one; a retry later when another writer is
        still writing it (its claim, no manifest yet)."""
        scan = self._timed(self.remote.scan, "listing")
        remote = {c.step: c for c in scan.committed}.get(info.step)
        if remote is not None and (remote.manifest.created, remote.manifest.files) == \
                (info.manifest.created, info.manifest.files):
            return remote
        if remote is None and info.step not in {p.step for p in scan.quarantined}:
            raise StorageError(f"{self.remote.url}: step {info.step} is being written by another writer; "
                               "trying again later")
        why = "is quarantined" if remote is None else "holds a different checkpoint (another timeline)"
        log.error("not mirroring step %d: the bucket's step %d %s; local retention decides on it alone",
                  info.step, info.step, why)
        with self._cond:
            self._skip.add(info.step)
        return None

    def store_records(self) -> None:
        """Copy the run's history to the bucket now (the daemon's last local deletions come after the
        final flush; the mirror's thread is idle by then)."""
        self._store_records()

    def _store_records(self) -> None:
        """The run's history, beside the checkpoints it tells of: never a reason for a pass to fail."""
        records = self.records
        if records is None:
            return
        try:
            self._timed(lambda: records(self.remote), "storing the run's history")
        except Exception as exc:  # noqa: BLE001 - a history is not a checkpoint
            log.warning("mirror: %s", exc)

    def _prune_remote(self) -> None:
        with self._cond:
            config, listing = self._config, sorted(self._remote.values(), key=lambda c: c.step)
        if config is None:
            return  # the run's policy is not known yet: nothing is deleted from the bucket
        plan = plan_retention(listing, config.retention("mirror"), datetime.now(timezone.utc),
                              monitor=config.monitor)  # type: ignore[arg-type]
        for step in plan.delete:
            self._timed(lambda: self.remote.delete(step), f"deleting step {step}")
            with self._cond:
                self._remote.pop(step, None)
                self._index_stale = True
            log.info("mirror retention: deleted step %d from %s", step, self.remote.url)
            self.on_pruned(step)
