"""A committed snapshot kept in shared memory for the next worker: a restart reads its checkpoint's
files from RAM instead of disk.

After a worker dies, the daemon keeps the segment that holds the newest committed checkpoint
(renamed `kept-<step>`, so no new segment takes its name) and offers it to the next worker only when
that checkpoint is the one to resume from. The worker reads it with pread (never mapped: see
layout), and every byte goes through the same checks against the checkpoint's manifest as a read
from disk; on any mismatch the worker reads the checkpoint from disk instead. Once the worker says it
resumed (or started fresh, or trains without ever restoring: its hello), the daemon removes it: its
memory goes back before the worker makes segments of its own (two at most), and the restart does not
wait for a state-sized file to be freed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
from typing import Optional

from savegame.errors import MalformedInput
from savegame.snapshot.layout import PAGE, FileSpan, Status, parse_control, parse_meta

log = logging.getLogger("savegame")
KEPT_NAME = re.compile(r"^kept-([0-9]{1,12})$")


def kept_name(step: int) -> str:
    return f"kept-{step}"


class KeptSnapshot:
    """The files of one committed checkpoint, in a kept segment."""

    def __init__(self, path: str, fd: int, step: int, files: tuple[FileSpan, ...]) -> None:
        self.path = path
        self.step = step
        self._fd = fd
        self._files = {span.path: span for span in files}

    @classmethod
    def open(cls, path: str) -> Optional["KeptSnapshot"]:
        """The kept snapshot at `path`, checked (a plain COMMITTED segment of this user); None, and the
        reason logged, when it is not usable (the restart then reads disk as always)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            log.warning("cannot open the checkpoint kept in shared memory (%s): reading it from disk", exc.strerror)
            return None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
                raise MalformedInput("not a plain file of this user")
            control = parse_control(os.pread(fd, PAGE, 0), info.st_size)
            if control.status != Status.COMMITTED:
                raise MalformedInput(f"its status is {control.status}, not committed")
            raw = os.pread(fd, control.meta_length, control.meta_offset)
            if len(raw) != control.meta_length:
                raise MalformedInput("its meta is cut short")
            meta = parse_meta(raw, control)
        except (OSError, MalformedInput) as exc:
            os.close(fd)
            log.warning("not reading the checkpoint kept in shared memory (%s): reading it from disk", exc)
            return None
        return cls(path, fd, meta.step, meta.files)

    def open_file(self, relpath: str, length: int) -> Optional[io.RawIOBase]:
        """A stream of file `relpath` when the snapshot holds it at the manifest's `length`, else None."""
        span = self._files.get(relpath)
        if span is None or span.length != length:
            return None
        return SpanReader(self._fd, span)

    def close(self) -> None:
        """Done with it (the daemon removes the file when the worker says it resumed: freeing a
        state-sized file takes time the restart need not wait for)."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


class SpanReader(io.RawIOBase):
    """One file's bytes in a segment, read with pread straight into the caller's buffer."""

    def __init__(self, fd: int, span: FileSpan) -> None:
        super().__init__()
        self._fd = fd
        self._span = span
        self._pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: "memoryview | bytearray") -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        want = min(view.nbytes, self._span.length - self._pos)
        if want <= 0:
            return 0
        got = os.preadv(self._fd, [view[:want]], self._span.offset + self._pos)
        if got <= 0:
            raise OSError(f"the kept segment ends early in {self._span.path}")
        self._pos += got
        return got
