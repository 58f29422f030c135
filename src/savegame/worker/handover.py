"""Saves handed over to the daemon through shared memory (a worker under `savegame run`).

The capture copies the tensors straight into a free segment (`reserve`, on the training thread), at
their offsets in state.safetensors; the writer thread adds the header and state.json (the exact
bytes, the same functions as the in-process writer; a capture in its own buffers, such as an
emergency save from live memory, it copies in whole), marks it READY and sends one `snapshot`
event; from then on the checkpoint no longer depends on this process: the daemon commits it even if
the worker dies the next instant. The daemon answers in the segment's status word (COMMITTED or
FAILED), which this side polls. At most two segments: one the daemon persists, one being filled;
when both are busy the next save waits (the back-pressure rule), but an emergency or final save is
written in-process rather than wait, and so is a save that waits when a stop comes (a stopping
worker then waits only for its last save: the older hand-overs are the daemon's to commit after it
exits). Files a capture renders (Keras' .weights.h5) go into the segment after state.json. Files
already on disk (TensorFlow's) and the parts of a torch.distributed job's ranks are written
in-process as before; so is a segment the daemon refused, or one it can no longer take (it died),
or one it never answered (ANSWER_TIMEOUT_S with no sign of it working; the segment's lock keeps the
two from both committing it): nothing handed over is lost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence

from savegame import protocol
from savegame.snapshot.layout import PAGE, FileSpan, SnapshotMeta, Status, round_up
from savegame.snapshot.persist import SegmentBusy, claim, commit_claimed  # the daemon's code: identical bytes
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.storage.direct import yield_to_training
from savegame.worker.adapter import STATE_FILE, TENSORS_FILE, Reservation
from savegame.worker.link import DaemonLink, daemon_alive, process_rank
from savegame.worker.safetensors_io import TensorSpec, buffer_address, encode_header, write_safetensors
from savegame.worker.segments import (MAX_SEGMENTS, SLACK, Segment, SegmentSink, capacity_for, create_segment,
                                      publish)
from savegame.worker.writer import DIRECT_ALIGN, SaveJob, state_bytes, tensors_metadata, write_checkpoint

log = logging.getLogger("savegame.worker")
POLL_S = 0.002
ALIVE_CHECK_S = 0.25
ANNOUNCE_TIMEOUT_S = 5.0
# A READY segment unanswered this long, and no sign of the daemon at work on our segments (an answer,
# a hand-over, a segment's lock held): the daemon will not take it (it could not open it), commit it here.
ANSWER_TIMEOUT_S = 30.0
URGENT_REASONS = ("emergency", "final")
META_PER_FILE = 1024  # the meta's room for each rendered file's entry (path, offset, length)
Done = Callable[[SaveJob, Optional[CheckpointInfo], Optional[BaseException]], None]


def eligible(job: SaveJob) -> bool:
    """Tensors, JSON and files rendered from the capture (Keras' .weights.h5) of a single-process
    worker: what a segment holds. Files already on disk (TensorFlow's) would only make a round trip."""
    return (job.capture.write is None and all(callable(source) for source in job.capture.files.values())
            and process_rank()[1] == 1)


class HandoverWriter:
    """BackgroundWriter's interface (submit, make_room, wait, close); the daemon commits."""

    def __init__(self, store: CheckpointStore, folder: str, link: DaemonLink, on_done: Done,
                 on_daemon_commit: Callable[[SaveJob, float], None],
                 stopping: Callable[[], bool] = lambda: False) -> None:
        self._store = store
        self._stopping = stopping  # a stop is pending: no save may wait for a segment past the grace period
        self._folder = folder
        self._link = link
        self._on_done = on_done  # saves this process wrote (or failed to)
        self._on_daemon_commit = on_daemon_commit  # saves the daemon committed (it already knows)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-handover",
                                        initializer=yield_to_training)
        self._inflight: Optional[Future[None]] = None
        self._segments: list[Optional[Segment]] = [None] * MAX_SEGMENTS
        self._lock = threading.Lock()  # reaping runs on the writer and on the training thread
        self._seq = 0
        self._alive_checked = 0.0
        self._progress = 0.0  # the last sign of the hand-over moving on (see ANSWER_TIMEOUT_S)
        self.inflight_step: Optional[int] = None
        self._newest_step = -1  # the last save submitted (when stopping, the one this exit reports)
        self.last_persist_s: Optional[float] = None
        self._reserved: Optional[Segment] = None  # lent to a capture that has not been submitted yet
        self._tail = SLACK  # room for state.json and the meta after the tensors (the last save's, once known)
        self._file_sizes: dict[str, int] = {}  # the last size of each rendered file (sizes the next segment)
        self._handing_over = True  # False once the daemon left a hand-over unanswered: saves are written here

    # -- the training thread --------------------------------------------------------------------

    def reserve(self, specs: Sequence[TensorSpec], step: int) -> Optional[Reservation]:
        """Before a capture copies: the data region of a free segment (waiting while both are busy,
        the back-pressure rule), laid out as write_safetensors lays out this step's state.safetensors,
        so the capture's copy is the segment's and the writer thread only adds the header, state.json
        and the meta. None: the capture uses its own buffers (no shared memory, a job's rank)."""
        if process_rank()[1] != 1 or not self._handing_over:
            return None
        self.make_room()
        self._unreserve()
        header = len(encode_header(specs, tensors_metadata(step), align=DIRECT_ALIGN))
        data = sum(spec.nbytes for spec in specs)
        segment = self._free_segment(PAGE + round_up(header + data) + self._tail)
        if segment is None:
            return None
        segment.set_status(Status.FILLING)
        self._reserved = segment
        return Reservation(memoryview(segment.buffer)[PAGE + header:PAGE + header + data], segment)

    def submit(self, job: SaveJob) -> None:
        self.make_room()
        self._unreserve(keep=_placed(job))
        self.inflight_step = self._newest_step = job.step
        self._inflight = self._pool.submit(self._run, job, time.monotonic())

    def make_room(self) -> None:
        """Until the last capture is out of the host buffers (in a segment, or written)."""
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None

    def wait(self) -> None:
        """Until every save is committed (by the daemon or here) or has failed; when stopping, until
        the last one is (older hand-overs are left to the daemon, see _left_to_the_daemon)."""
        self.make_room()
        while self._settle() and not self._left_to_the_daemon():
            time.sleep(POLL_S)
        self.inflight_step = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()
        with self._lock:
            for index, segment in enumerate(self._segments):
                if segment is not None:
                    segment.close(unlink=segment.job is None)  # a pending hand-over stays for the daemon
                    self._segments[index] = None
        if self._link.gone or not daemon_alive():  # nobody else will remove the (now empty) folder
            with contextlib.suppress(OSError):
                os.rmdir(self._folder)

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self, job: SaveJob, submitted: float) -> None:
        placed = _placed(job)
        try:
            if not self._handing_over or not eligible(job) or not self._hand_over(job, submitted, placed):
                info = write_checkpoint(self._store, job)  # from the segment, when the capture lies there
                self._file_sizes.update({f.path: f.bytes for f in info.manifest.files if f.path in job.capture.files})
                self.last_persist_s = time.monotonic() - submitted
                self._on_done(job, info, None)
        except BaseException as exc:  # reported to the training thread through on_done
            self._on_done(job, None, exc)
        finally:
            if placed is not None:
                with self._lock:
                    if placed.status == Status.FILLING:  # never handed over (written here, or failed)
                        placed.job = None
                        placed.set_status(Status.FREE)

    def _hand_over(self, job: SaveJob, submitted: float, placed: Optional[Segment]) -> bool:
        """Render into a segment (`placed`: the one the capture was copied into) and announce it;
        False: write in-process instead (nothing was handed)."""
        header = encode_header(job.capture.blobs, tensors_metadata(job.step), align=DIRECT_ALIGN)
        tensor_bytes = len(header) + sum(blob.nbytes for blob in job.capture.blobs)
        state = state_bytes(job)
        files = (FileSpan(TENSORS_FILE, PAGE, tensor_bytes),
                 FileSpan(STATE_FILE, PAGE + round_up(tensor_bytes), len(state)))
        meta = SnapshotMeta(job.step, job.epoch, job.reason, dict(job.metrics), job.framework, job.run_id,
                            job.resumed_from, files)
        rendered = list(job.capture.files.items())  # functions that write a file in order (Keras' .weights.h5)
        after_state = files[1].offset + round_up(len(state))
        room = sum(round_up(self._room_for(job, path)) for path, _write in rendered)
        meta_room = len(meta.to_json()) + META_PER_FILE * len(rendered)
        required = after_state + room + meta_room
        self._tail = max(SLACK, required - files[1].offset)  # what the next reservation leaves after the tensors
        # An emergency or final save never queues behind two commits (slow ones would eat the grace
        # period): with both segments busy it is written here, beside the daemon's commits.
        urgent = job.reason in URGENT_REASONS
        segment = placed if placed is not None else self._free_segment(required, wait=not urgent)
        if segment is None:
            return False
        try:
            if placed is not None:  # the tensors are in place; what follows them must fit, and nothing may move
                if required > segment.capacity:
                    raise ValueError(f"state.json and the meta need {required} bytes, the segment holds "
                                     f"{segment.capacity}")
                reserved = job.capture.reserved
                if reserved is None or buffer_address(reserved.data) != segment.address + PAGE + len(header):
                    raise ValueError("the capture does not lie where the header puts its tensors")
            segment.set_status(Status.FILLING)
            # Bytes the capture copied into the segment stay where they are (SegmentSink skips them):
            # then this writes the header only, and waits for the copy as it goes.
            written = write_safetensors(SegmentSink(segment, PAGE), job.capture.blobs, tensors_metadata(job.step),
                                        align=DIRECT_ALIGN, ready=job.capture.ready)
            if written != tensor_bytes:
                raise ValueError(f"rendered {written} bytes of {TENSORS_FILE}, planned {tensor_bytes}")
            SegmentSink(segment, files[1].offset).write(state)
            meta, meta_offset = self._render_files(segment, meta, rendered, after_state, meta_room)
            self._seq += 1
            with self._lock:  # from here on the training thread's reaping may see it
                segment.job, segment.handed_at, segment.seq = job, submitted, self._seq
                publish(segment, meta, meta_offset, self._seq)
                self._progress = time.monotonic()
        except Exception as exc:  # the capture is still whole: written in-process, which then cleans it up
            self._release(segment)  # (a placed capture's bytes stay: nothing takes a segment before the write is done)
            log.warning("could not render step %d into shared memory (%s): writing it here", job.step, exc)
            return False
        except BaseException:
            self._release(segment)
            _clean_up(job)
            raise
        _clean_up(job)
        if not self._announce(segment, job.step):
            with self._lock:
                if segment.job is job:  # (unless the reaping found the daemon gone and wrote it already)
                    self._write_here(segment)  # nobody will take it: commit it from the segment ourselves
        return True

    def _room_for(self, job: SaveJob, path: str) -> int:
        """Room for a rendered file: its last size (with a margin) or the capture's estimate."""
        last = self._file_sizes.get(path)
        return max(job.capture.file_bytes.get(path, 0), last + last // 16 + SLACK if last is not None else 0, SLACK)

    def _render_files(self, segment: Segment, meta: SnapshotMeta, rendered: list[tuple[str, Any]], offset: int,
                      meta_room: int) -> tuple[SnapshotMeta, int]:
        """Write each rendered file into the segment after state.json; the meta that lists them, and
        where it goes. A file that outgrows the segment fails the render (then written in-process)."""
        spans = list(meta.files)
        for path, write in rendered:
            sink = SegmentSink(segment, offset, limit=segment.capacity - meta_room)
            write(sink)
            spans.append(FileSpan(path, offset, sink.pos - offset))
            self._file_sizes[path] = sink.pos - offset
            offset = round_up(sink.pos)
        return dataclasses.replace(meta, files=tuple(spans)), offset

    def _unreserve(self, keep: Optional[Segment] = None) -> None:
        """A segment lent to a capture that never came to the writer (it failed) is free again."""
        segment, self._reserved = self._reserved, None
        if segment is not None and segment is not keep:
            self._release(segment)

    def _release(self, segment: Segment) -> None:
        """A segment whose render failed is free again (under the lock: the reaping must not see it half done)."""
        with self._lock:
            segment.job = None
            segment.set_status(Status.FREE)

    def _free_segment(self, required: int, wait: bool = True) -> Optional[Segment]:
        """A segment holding nothing the daemon still has to commit, at least `required` bytes; waits
        while both are busy (unless not `wait`, or a stop is pending). None when shared memory is
        refused, or both are busy and it does not wait (then this save is written here)."""
        while True:
            with self._lock:
                self._reap()
                free = [i for i, s in enumerate(self._segments) if s is None or s.job is None]
                for index in free:
                    segment = self._segments[index]
                    if segment is not None and segment.capacity >= required:
                        return segment
                if free:
                    return self._replace(free[0], required)
            if not wait or self._stopping():
                return None
            time.sleep(POLL_S)

    def _replace(self, index: int, required: int) -> Optional[Segment]:
        old = self._segments[index]
        if old is not None:
            old.close(unlink=True)  # too small: its memory goes before a bigger segment's is taken
            self._segments[index] = None
        try:
            segment = create_segment(self._folder, index, capacity_for(required))
        except OSError as exc:
            log.warning("cannot make a %d-byte snapshot segment in %s (%s): saving in this process",
                        required, self._folder, exc)
            return None
        self._segments[index] = segment
        return segment

    def _announce(self, segment: Segment, step: int) -> bool:
        deadline = time.monotonic() + ANNOUNCE_TIMEOUT_S
        while time.monotonic() < deadline:
            sent = self._link.try_send(protocol.EVENT_SNAPSHOT, segment=segment.name, step=step, seq=segment.seq)
            if sent is not None:
                return sent
            time.sleep(POLL_S)  # the daemon's queue is full: it is busy, not gone
        return False

    # -- either thread, under the lock ----------------------------------------------------------

    def _settle(self) -> bool:
        """Reap what the daemon answered; True while a handed-over save is still pending."""
        with self._lock:
            self._reap()
            return any(s is not None and s.job is not None for s in self._segments)

    def _left_to_the_daemon(self) -> bool:
        """Stopping, with the last save (the one this exit reports) committed: the older hand-overs
        still pending are the daemon's to commit after this process exits, as after a SIGKILL, rather
        than wait for them here past the grace period."""
        if not self._stopping() or self._link.gone or not daemon_alive():
            return False
        with self._lock:
            return all(s.job.step < self._newest_step for s in self._pending())

    def _reap(self) -> None:
        daemon_gone = self._daemon_gone()
        for segment in self._pending():
            status = segment.status
            if status == Status.COMMITTED:
                self._progress = time.monotonic()
                self._daemon_committed(segment)
            elif status == Status.FAILED:
                self._progress = time.monotonic()
                self._write_here(segment, f"the daemon did not commit step {segment.job.step} from shared "
                                          "memory: writing it here")
            elif daemon_gone and status == Status.READY:
                self._write_here(segment)
        self._unanswered()

    def _pending(self) -> list[Segment]:
        """The segments the daemon still has to answer, oldest hand-over first (its order of work)."""
        return sorted((s for s in self._segments if s is not None and s.job is not None), key=lambda s: s.seq)

    def _unanswered(self) -> None:
        """After ANSWER_TIMEOUT_S without progress, the oldest pending segment: if its lock is free the
        daemon has not started on it (and now cannot: it would find the lock taken), so commit it here;
        if held, the daemon is committing it, however long that takes: wait on."""
        pending = self._pending()
        now = time.monotonic()
        if not pending or now - self._progress < ANSWER_TIMEOUT_S:
            return
        self._progress = now  # the next look, one time limit from now
        for segment in pending:  # oldest first: the daemon works in that order
            try:
                self._write_here(segment, f"no answer from the daemon for step {segment.job.step} in "
                                          f"{now - segment.handed_at:.0f}s: committing it here", block=False)
            except SegmentBusy:
                log.info("step %d is being committed (its lock is held): waiting for the daemon", segment.job.step)
                return
            if self._handing_over:
                # A daemon that cannot take one hand-over will not take the next: without this, every
                # save would wait out the time limit (with both segments busy, training too).
                log.warning("the daemon takes no hand-over: saving in this process from now on")
                self._handing_over = False

    def _daemon_committed(self, segment: Segment) -> None:
        job, segment.job = segment.job, None
        self.last_persist_s = time.monotonic() - segment.handed_at
        self._on_daemon_commit(job, self.last_persist_s)

    def _write_here(self, segment: Segment, warning: str = "", block: bool = True) -> None:
        """Commit a handed-over segment in this process (the daemon refused it, is gone, or never
        answered), under its lock: never while the daemon commits it. `warning` is logged once the
        lock is ours. SegmentBusy (only when not `block`): the daemon holds it."""
        with claim(segment.fd, block):
            if segment.status == Status.COMMITTED:  # the daemon answered while we waited for the lock
                self._daemon_committed(segment)
                return
            if warning:
                log.warning("%s", warning)
            job, segment.job = segment.job, None
            segment.set_status(Status.READY)
            try:
                info = commit_claimed(segment.fd, self._store)
            except BaseException as exc:
                self._on_done(job, None, exc)
                return
        self.last_persist_s = time.monotonic() - segment.handed_at
        self._on_done(job, info, None)

    def _daemon_gone(self) -> bool:
        now = time.monotonic()
        if now - self._alive_checked < ALIVE_CHECK_S:
            return False
        self._alive_checked = now
        return self._link.gone or not daemon_alive()


def _placed(job: SaveJob) -> Optional[Segment]:
    """The segment the capture was copied into (HandoverWriter.reserve), if any."""
    reserved = job.capture.reserved
    return reserved.owner if reserved is not None and isinstance(reserved.owner, Segment) else None


def _clean_up(job: SaveJob) -> None:
    """The capture's own clean-up, once its bytes are in a segment (write_checkpoint runs it otherwise)."""
    if job.capture.cleanup is not None:
        job.capture.cleanup()
