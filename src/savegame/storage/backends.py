"""Storage mechanism: how bytes reach local disk or object storage, and how a commit is made atomic.

Two commit strategies, chosen by the location (like Orbax's rename vs commit-marker atomicity):
- local disk (storage/local.py): write into a staging folder on the same filesystem, fsync every
  file, write and fsync the manifest, rename the folder into place, fsync the parent;
- object storage (storage/objectstore.py, no rename): upload the payload under the final prefix,
  then write manifest.json last and create-only.
Paths given to a backend are relative to the run root and use '/'. This module holds what both share;
storage/factory.py picks one (the backends never import the factory).
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Protocol

from savegame.errors import StorageError
from savegame.storage.location import Location

STAGING_DIR = ".staging"
QUARANTINE_DIR = ".quarantine"


@dataclass(frozen=True)
class FolderEntry:
    """A ckpt-* folder as found by a scan, before its manifest is parsed."""

    name: str
    step: int
    manifest: bytes | None  # None: no readable manifest.json
    read_error: str | None
    missing: bool  # True only when the manifest is known not to exist: an unreadable one is damage
    quarantined: bool
    modified: float | None  # newest modification time (seconds since the epoch), when known


@dataclass(frozen=True)
class StagingEntry:
    """Leftovers of a save that never committed."""

    path: str
    modified: float
    writer_alive: bool | None  # None: unknown (another host, or object storage)


class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> int: ...
    def close(self) -> None: ...


class Staging(Protocol):
    token: str  # names this staging to other processes that join it (the ranks of one job)

    def open(self, relpath: str) -> Sink: ...
    def commit(self, manifest: bytes) -> None: ...
    def abort(self) -> None: ...


def storage_error(exc: BaseException, what: str) -> StorageError:
    """Map a backend error to StorageError with a message that says what failed and what to do."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return StorageError(exc.errno or 0, f"{what}: no space left ({os.strerror(exc.errno or 0)}); "
                            "free disk space or keep fewer checkpoints")
    if isinstance(exc, PermissionError):
        return StorageError(errno.EACCES, f"{what}: permission denied; check the folder's owner and mode")
    return StorageError(getattr(exc, "errno", None) or errno.EIO, f"{what}: {type(exc).__name__}: {exc}")

