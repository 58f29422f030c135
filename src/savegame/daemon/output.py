"""The worker's output: written into files in the run folder, forwarded by the daemon.

A worker that prints to the daemon's terminal dies with EIO when that terminal goes away (a dropped
SSH session), and one that prints into a pipe dies with EPIPE when the daemon is killed. Files do
neither: the worker's stdout and stderr are `.savegame/worker.out` and `.savegame/worker.err`
(appended, kept across restarts, trimmed when they grow past a cap), and a daemon thread forwards
new bytes to the daemon's own stdout and stderr, ignoring a terminal that is gone.
"""
from __future__ import annotations

import os
import stat
import sys
import threading
from typing import BinaryIO, Optional

from savegame.daemon.status import STATUS_DIR
from savegame.errors import ConfigError

FORWARD_INTERVAL_S = 0.1
MAX_LOG_BYTES = 64 << 20  # per file; beyond it the older half moves to <name>.1
CHUNK = 1 << 20


def binary_stream(name: str) -> Optional[BinaryIO]:
    """The daemon's own sys.stdout / sys.stderr as bytes (None when there is none)."""
    stream = getattr(sys, name, None)
    return getattr(stream, "buffer", None)


class WorkerOutput:
    def __init__(self, run_dir: str, stdout: Optional[BinaryIO], stderr: Optional[BinaryIO],
                 names: tuple[str, str] = ("worker.out", "worker.err")) -> None:
        folder = os.path.join(run_dir, STATUS_DIR)
        self._streams = [_Stream(os.path.join(folder, names[0]), stdout),
                         _Stream(os.path.join(folder, names[1]), stderr)]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="savegame-output", daemon=True)

    @property
    def fds(self) -> tuple[int, int]:
        """The descriptors to give the worker as its stdout and stderr."""
        return self._streams[0].write_fd, self._streams[1].write_fd

    def start(self) -> None:
        self._thread.start()

    def pump(self) -> None:
        """Forward what the worker wrote since the last look."""
        with self._lock:
            for stream in self._streams:
                stream.forward()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.pump()
        for stream in self._streams:
            stream.close()

    def _run(self) -> None:
        while not self._stop.wait(FORWARD_INTERVAL_S):
            self.pump()


class _Stream:
    def __init__(self, path: str, target: Optional[BinaryIO]) -> None:
        self.path = path
        self._target = target
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        self.write_fd = os.open(path, flags, 0o640)  # never blocks on a FIFO planted there
        if not stat.S_ISREG(os.fstat(self.write_fd).st_mode):
            os.close(self.write_fd)
            raise ConfigError(f"{path} is not a regular file: savegame keeps the worker's output there; remove it")
        os.set_blocking(self.write_fd, True)
        self._read_fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._offset = os.fstat(self.write_fd).st_size  # what earlier runs wrote was forwarded then

    def forward(self) -> None:
        while True:
            data = os.pread(self._read_fd, CHUNK, self._offset)
            if not data:
                break
            self._offset += len(data)
            self._write(data)
        if self._offset > MAX_LOG_BYTES:
            self._trim()

    def _write(self, data: bytes) -> None:
        if self._target is None:
            return
        try:
            self._target.write(data)
            self._target.flush()
        except (OSError, ValueError):  # the terminal is gone (EIO), the pipe closed: the file keeps it all
            self._target = None

    def _trim(self) -> None:
        """Keep the newest half in the file and the older half in <name>.1 (lines written meanwhile
        may be cut: the worker appends while this runs)."""
        keep = self._offset // 2
        old = os.open(self.path + ".1", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        try:
            done = 0
            while done < self._offset - keep:
                done += os.sendfile(old, self._read_fd, done, self._offset - keep - done) or 1
        finally:
            os.close(old)
        tail = os.pread(self._read_fd, keep, self._offset - keep)
        os.ftruncate(self.write_fd, 0)
        view = memoryview(tail)
        while view:
            view = view[os.write(self.write_fd, view):]
        self._offset = len(tail)

    def close(self) -> None:
        for fd in (self.write_fd, self._read_fd):
            try:
                os.close(fd)
            except OSError:
                pass
