"""Writes captures in the background, one at a time (back-pressure: never more than one extra copy)."""
from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from savegame.storage import CheckpointInfo, CheckpointStore, StagedCheckpoint
from savegame.storage.checksum import CHUNK
from savegame.worker.adapter import STATE_FILE, TENSORS_FILE, Capture
from savegame.worker.safetensors_io import buffer_address, write_safetensors

log = logging.getLogger("savegame.worker")
DIRECT_ALIGN = 4096  # file offsets, lengths and memory addresses of O_DIRECT writes
DIRECT_MIN = 1 << 20  # aligned writes at least this large skip the bounce buffer
BOUNCE_BYTES = 8 << 20


@dataclass(frozen=True)
class SaveJob:
    capture: Capture
    core_state: dict
    step: int
    epoch: int
    reason: str
    metrics: Mapping[str, float]
    framework: str
    run_id: str
    resumed_from: Optional[int]


def tensors_metadata(step: int) -> dict[str, str]:
    """The safetensors `__metadata__` of a checkpoint (every writer uses this: identical bytes)."""
    return {"format": "savegame", "step": str(step)}


def state_bytes(job: SaveJob) -> bytes:
    """state.json of a save: the core state and the adapter's (every writer uses this)."""
    return json.dumps({**job.core_state, "adapter": job.capture.state}).encode()


def write_checkpoint(store: CheckpointStore, job: SaveJob) -> CheckpointInfo:
    """Stage, write, commit. The capture's buffers are only read, never kept."""
    if job.capture.write is not None:
        return job.capture.write(store, job)
    staged = store.begin(job.step)
    try:
        with staged:
            with staged.open(TENSORS_FILE) as f, DirectWrites(f) as direct:
                write_safetensors(direct, job.capture.blobs, tensors_metadata(job.step),
                                  align=DIRECT_ALIGN, ready=job.capture.ready)
            staged.write_bytes(STATE_FILE, state_bytes(job))
            for relpath, source in job.capture.files.items():
                if callable(source):
                    with staged.open(relpath) as sink:
                        source(sink)  # writes the file's bytes in order; the sink checksums them
                else:
                    _copy_in(staged, relpath, source)
            return staged.commit(epoch=job.epoch, reason=job.reason, metrics=job.metrics,
                                 framework=job.framework, run_id=job.run_id, resumed_from=job.resumed_from)
    finally:
        if job.capture.cleanup is not None:
            job.capture.cleanup()


class DirectWrites:
    """Sends a local file's bytes to the disk around the page cache (O_DIRECT).

    A buffered write copies every byte into the page cache and leaves fsync to push it out; on a
    2-core VM that took 2.4-4.2 s and about half the training thread's throughput per GiB, against
    0.7 s for O_DIRECT, and fresh page-cache pages are themselves costly on a VM (0.8 s against
    0.25 s for 256 MB here). Page-aligned buffers go to the disk as they are; anything else passes
    through a small aligned bounce buffer. Only the last partial page is written normally. Object
    stores and filesystems that refuse O_DIRECT take the normal path. The wrapped writer still sees
    every byte in order (it checksums them). Use it as a context manager: leaving it flushes the
    bounce buffer (an exception leaves the file unfinished, and the save is aborted anyway).
    """

    def __init__(self, f: Any) -> None:
        self._f = f
        self._fd = _probe_direct(_local_fd(f))
        self._pos = 0  # bytes handed to the file so far
        self._direct = False
        self._bounce = _bounce_buffer() if self._fd is not None else None
        self._filled = 0

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        total = view.nbytes
        if self._bounce is None:
            self._send(view, direct=False)
            return total
        while view.nbytes:
            if self._filled == 0 and view.nbytes >= DIRECT_MIN and self._pos % DIRECT_ALIGN == 0 \
                    and (buffer_address(view) or 1) % DIRECT_ALIGN == 0:
                bulk = view.nbytes - view.nbytes % DIRECT_ALIGN
                self._send(view[:bulk], direct=True)  # aligned: no copy
                view = view[bulk:]
                continue
            n = min(view.nbytes, len(self._bounce) - self._filled)
            self._bounce[self._filled:self._filled + n] = view[:n]
            self._filled += n
            view = view[n:]
            if self._filled == len(self._bounce):
                self._send(memoryview(self._bounce), direct=True)
                self._filled = 0
        return total

    def __enter__(self) -> "DirectWrites":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.flush()

    def flush(self) -> None:
        """Write what the bounce buffer holds: whole pages directly, the last partial page normally."""
        if self._bounce is None or not self._filled:
            return
        bounce, pages = memoryview(self._bounce), self._filled - self._filled % DIRECT_ALIGN
        if pages:
            self._send(bounce[:pages], direct=True)
        if self._filled > pages:
            self._send(bounce[pages:self._filled], direct=False)
        self._filled = 0

    def _send(self, view: memoryview, direct: bool) -> None:
        if self._fd is not None and direct != self._direct:
            flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
            fcntl.fcntl(self._fd, fcntl.F_SETFL, (flags | os.O_DIRECT) if direct else (flags & ~os.O_DIRECT))
            self._direct = direct
        self._f.write(view)
        self._pos += view.nbytes


_per_thread = threading.local()


def _bounce_buffer() -> mmap.mmap:
    """The writer thread's page-aligned bounce buffer, made once (fresh memory is slow to touch)."""
    if getattr(_per_thread, "bounce", None) is None:
        _per_thread.bounce = mmap.mmap(-1, BOUNCE_BYTES)
    return _per_thread.bounce


def _local_fd(f: Any) -> Optional[int]:
    """The descriptor of a staged local file, or None (object storage)."""
    try:
        return int(f.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return None


def _probe_direct(fd: Optional[int]) -> Optional[int]:
    """`fd` if this file takes O_DIRECT writes, else None. Writes one zero block at offset 0 of the
    (still empty) file, which the header then overwrites."""
    if fd is None or not hasattr(os, "O_DIRECT") or os.lseek(fd, 0, os.SEEK_CUR) != 0:
        return None
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    block = mmap.mmap(-1, DIRECT_ALIGN)  # page-aligned, zeroed
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        return fd if os.pwrite(fd, block, 0) == DIRECT_ALIGN else None
    except OSError:
        return None
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        block.close()


def _copy_in(staged: StagedCheckpoint, relpath: str, local: str) -> None:
    with open(local, "rb", buffering=0) as src, staged.open(relpath) as dst:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := src.readinto(view):
            dst.write(view[:n])


WRITER_NICENESS = 10


def _yield_to_training() -> None:
    """Persisting may take longer; training must not slow down. A lower priority for the writer
    thread (and the checksum thread it starts, which inherits it) leaves the cores to training."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):
        pass


class BackgroundWriter:
    """One writer thread; `submit` first waits for the save in flight."""

    def __init__(self, store: CheckpointStore, on_done: Callable[[SaveJob, Optional[CheckpointInfo],
                                                                  Optional[BaseException]], None]) -> None:
        self._store = store
        self._on_done = on_done
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-writer",
                                        initializer=_yield_to_training)
        self._inflight: Optional[Future[None]] = None
        self.inflight_step: Optional[int] = None
        self.last_persist_s: Optional[float] = None  # submit -> commit of the last save that committed

    def wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None
            self.inflight_step = None

    def make_room(self) -> None:
        """Until the host buffers are free for the next capture: here, once the last save is written."""
        self.wait()

    def submit(self, job: SaveJob) -> None:
        self.wait()
        self.inflight_step = job.step
        self._inflight = self._pool.submit(self._run, job, time.monotonic())

    def _run(self, job: SaveJob, submitted: float) -> None:
        try:
            info = write_checkpoint(self._store, job)
        except BaseException as exc:  # reported to the training thread through on_done
            self._on_done(job, None, exc)
            return
        self.last_persist_s = time.monotonic() - submitted
        self._on_done(job, info, None)

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

