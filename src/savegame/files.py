"""Small files replaced whole: status, settings, records, the run id, the metrics textfile.

One way to do it everywhere: a reader sees the old file or the new one, never part of one, and
the temporary file is always created new (O_EXCL, O_NOFOLLOW), so nothing is ever written through
a link someone planted in its place.
"""
from __future__ import annotations

import contextlib
import os
import uuid


def replace_file(path: str, data: bytes, mode: int = 0o644, durable: bool = False) -> None:
    """Replace `path` by a file holding `data`. `durable`: on disk (the file and its folder's entry)
    before this returns, for records a power cut must not take back. OSError; nothing is left behind."""
    tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp"  # never *.json, *.prom: never read half-written
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _sync_folder(os.path.dirname(path) or ".")


def _sync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
