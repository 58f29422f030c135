"""The daemon's end of the shared-memory hand-over: it commits what a worker handed over.

A `snapshot` event names a segment in the run's private /dev/shm folder. The daemon opens it (a
plain file of this user, named for the sending process), checks it and writes it through the store
like any checkpoint, then answers in the segment's status word. A bad segment is logged and
dropped (FAILED: the worker writes it itself); it never takes the daemon down. A segment whose lock
its worker holds (it got no answer in time and commits it itself) is left to it. No framework is
imported here. Commits run one at a time on a thread of their own, so the daemon's loop goes on
(watchdog pings, signals, events) while a big state is written; a worker that dies right after a
hand-over is only handled (and restarted) once every commit under way is done.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import os
import time
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional

from savegame import protocol
from savegame.errors import MalformedInput
from savegame.snapshot import folder as shm
from savegame.snapshot.kept import KEPT_NAME, kept_name
from savegame.snapshot.layout import SEGMENT_NAME, Status
from savegame.snapshot.persist import CHUNK, SegmentBusy, control_at, open_segment, persist, ready_step
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.storage.direct import yield_to_training

log = logging.getLogger("savegame")


class SnapshotTaker:
    def __init__(self, run_dir: str, store: CheckpointStore, node: str = "", root: str = shm.SHM_ROOT,
                 enabled: bool = True, wake: Callable[[], None] = lambda: None) -> None:
        self.store = store
        self._buffer: Optional[mmap.mmap] = None  # page-aligned, reused from commit to commit
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-commit",
                                             initializer=yield_to_training)
        self._pending: collections.deque[Future[Optional[dict[str, Any]]]] = collections.deque()
        self._wake = wake  # tells the daemon's loop a commit is done
        self.dropped = 0
        self.folder: Optional[str] = None
        self.kept: Optional[tuple[int, str]] = None  # (step, path): a checkpoint kept in RAM for the next worker
        self._submitted: set[str] = set()  # a dead worker's unannounced segments given to the committer
        if enabled or os.path.lexists(shm.folder_for(run_dir, root, node)):
            self.folder = shm.prepare_folder(run_dir, root, node)
        if self.folder is not None:  # what a killed daemon left: the READY ones are committed, then all go
            for event in self.worker_gone(keep=enabled):
                log.info("committed step %s, handed over before the last daemon died", event["step"])
        if not enabled and self.folder is not None:  # salvaged; this run saves without shared memory
            shm.remove(self.folder)
            self.folder = None

    def env(self, resume_step: Optional[int]) -> dict[str, str]:
        """What tells a worker to hand its saves over (nothing when shared memory is not usable), and
        where the checkpoint it resumes from is kept in RAM, when it is (a kept other one is let go)."""
        env = {protocol.ENV_SEGMENTS: self.folder} if self.folder else {}
        if self.kept is not None and self.kept[0] == resume_step:
            env[protocol.ENV_RESTORE_SEGMENT] = self.kept[1]
        else:
            self.release_kept()
        return env

    def release_kept(self) -> None:
        """The next worker has loaded its checkpoint (or will not): the kept copy's memory goes back."""
        if self.kept is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.kept[1])
            self.kept = None

    def submit(self, event: Mapping[str, Any]) -> None:
        """Commit the segment a `snapshot` event names, beside the daemon's loop (see finished())."""
        if self.folder is None:
            return
        future = self._committer.submit(self.take, dict(event))
        future.add_done_callback(lambda _done: self._wake())
        self._pending.append(future)

    @property
    def committing(self) -> bool:
        """A commit is under way (the worker may be waiting on it: it is not hung)."""
        return bool(self._pending)

    def finished(self) -> list[dict[str, Any]]:
        """The commits done since the last call, in hand-over order, as `committed` events."""
        done = []
        while self._pending and self._pending[0].done():
            result = self._pending.popleft().result()  # a bug in a commit surfaces in the daemon's loop
            if result is not None:
                done.append(result)
        return done

    def drain(self) -> list[dict[str, Any]]:
        """Wait for every commit under way; finished()'s events for all of them."""
        futures.wait(list(self._pending))
        return self.finished()

    def take(self, event: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """Commit the segment a `snapshot` event names; the `committed` event it amounts to, or None."""
        if self.folder is None:
            return None
        began = time.monotonic()
        try:
            fd = open_segment(self.folder, event.get("segment"), int(event["pid"]))  # type: ignore[arg-type]
        except MalformedInput as exc:
            self._drop(exc)
            return None
        try:
            if self._buffer is None:
                self._buffer = mmap.mmap(-1, CHUNK)
            info = persist(fd, self.store, self._buffer)
        except SegmentBusy:  # not ours to commit, nor to answer
            log.info("step %s is being committed by its worker: left to it", event.get("step"))
            return None
        except MalformedInput as exc:
            self._drop(exc)
            return None
        except OSError as exc:  # StorageError included: the worker is told (FAILED) and writes it itself
            log.error("could not commit the snapshot of step %s from shared memory: %s", event.get("step"), exc)
            return None
        finally:
            os.close(fd)
        log.info("committed step %d (%s) from shared memory in %.3fs", info.step, info.reason,
                 time.monotonic() - began)
        return committed_event(info, int(event["pid"]), time.monotonic() - began)

    def worker_gone(self, keep: bool = True) -> list[dict[str, Any]]:
        """The worker died: commit what it made READY but may not have announced (killed between the
        two), keep the segment that holds the newest committed checkpoint for the next worker to
        restore from (when `keep`), remove the rest (a SIGKILLed worker cannot). The commits, as events."""
        if self.folder is None:
            return []
        committed = self.drain() + self.salvage()
        self.kept = self._keep_newest() if keep else None
        shm.clear(self.folder, keep=self.kept[1] if self.kept else None)
        self._submitted.clear()
        return committed

    def _keep_newest(self) -> Optional[tuple[int, str]]:
        """(step, path) of the segment holding the newest committed checkpoint, renamed kept-<step>."""
        assert self.folder is not None
        try:
            newest = max((c.step for c in self.store.list()), default=None)
        except OSError:
            return None
        for name in sorted(os.listdir(self.folder)):
            if not (SEGMENT_NAME.match(name) or KEPT_NAME.match(name)):
                continue
            control = control_at(os.path.join(self.folder, name))
            if control is not None and control.status == Status.COMMITTED and control.step == newest:
                path = os.path.join(self.folder, kept_name(newest))
                try:
                    os.rename(os.path.join(self.folder, name), path)
                except OSError:
                    return None
                return newest, path
        return None

    def salvage(self) -> list[dict[str, Any]]:
        """Commit every READY segment in the folder, oldest step first (a step already committed is
        skipped); the commits, as events."""
        events = []
        for event in self._unannounced_events():
            committed = self.take(event)
            if committed is not None:
                events.append(committed)
        return events

    def submit_unannounced(self) -> bool:
        """A dead worker's READY segments (killed before it could announce them) go to the committer
        thread like any hand-over, each once: committed on the loop, a big one would stop its
        watchdog pings. Whether any went (worker_gone() then finds them committed)."""
        if self.folder is None:
            return False
        fresh = [e for e in self._unannounced_events() if e["segment"] not in self._submitted]
        for event in fresh:
            self._submitted.add(event["segment"])
            self.submit(event)
        return bool(fresh)

    def _unannounced_events(self) -> list[dict[str, Any]]:
        """A `snapshot` event for every READY segment in the folder whose step is not committed yet,
        oldest step first."""
        assert self.folder is not None
        ready = []
        for name in sorted(os.listdir(self.folder)):
            match = SEGMENT_NAME.match(name)
            step = ready_step(os.path.join(self.folder, name)) if match else None
            if step is not None:
                ready.append((step, name, int(match.group(1))))  # type: ignore[union-attr]
        try:
            done = {c.step for c in self.store.list()}
        except OSError as exc:
            log.error("cannot list %s to commit what a dead worker handed over: %s", self.store.url, exc)
            return []
        return [{"event": protocol.EVENT_SNAPSHOT, "segment": name, "pid": pid, "step": step}
                for step, name, pid in sorted(ready) if step not in done]

    def close(self) -> None:
        """The run ends: a READY segment of a worker killed on the way out is committed first."""
        if self.folder is not None:
            for event in self.worker_gone(keep=False):
                log.info("committed step %s, handed over by a worker killed at the end of the run", event["step"])
            shm.remove(self.folder)
        self._committer.shutdown()
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None

    def _drop(self, exc: BaseException) -> None:
        self.dropped += 1
        log.warning("dropped a snapshot hand-over: %s", exc)


def committed_event(info: CheckpointInfo, pid: int, persist_s: float) -> dict[str, Any]:
    """The `committed` event a worker sends after writing a checkpoint itself, for the same commit."""
    return {"event": "committed", "pid": pid, "step": info.step, "epoch": info.epoch, "reason": info.reason,
            "path": info.path, "bytes": info.bytes, "metrics": dict(info.metrics), "persist_s": persist_s,
            "by": "daemon"}
