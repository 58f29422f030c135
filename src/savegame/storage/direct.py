"""Writes of a local file's large aligned runs around the page cache (O_DIRECT), for every writer of
checkpoint files: the worker's, the daemon's commits of hand-overs, Keras' and DCP's file writers."""
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import threading
from typing import Any, Optional

DIRECT_ALIGN = 4096  # file offsets, lengths and memory addresses of O_DIRECT writes
DIRECT_MIN = 1 << 20  # aligned writes at least this large skip the bounce buffer
BOUNCE_BYTES = 8 << 20
WRITER_NICENESS = 10


def yield_to_training() -> None:
    """Persisting may take longer; training must not slow down. A lower priority for the thread that
    writes checkpoints (and the checksum thread it starts, which inherits it: the worker's writer, the
    daemon's committer) leaves the cores to training."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):
        pass


def buffer_address(view: memoryview) -> Optional[int]:
    """Where a buffer's bytes are in memory (None when that cannot be told without copying)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only or empty
        return None


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
