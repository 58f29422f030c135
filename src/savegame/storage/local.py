"""Local disk: staging folder, fsync of every file and the manifest, rename into place, fsync the parent."""
from __future__ import annotations

import errno
import os
import shutil
import socket
import time
import uuid
from typing import BinaryIO

from savegame.errors import CheckpointExists
from savegame.storage.backends import (QUARANTINE_DIR, QUARANTINE_NAME, STAGING_DIR, FolderEntry, Sink, Staging,
                                       StagingEntry)
from savegame.storage.location import Location
from savegame.storage.manifest import MANIFEST_NAME, step_of_folder


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _LocalSink:
    def __init__(self, path: str) -> None:
        self._file = open(path, "wb", buffering=0)

    def fileno(self) -> int:
        """The descriptor, for writers that tune how bytes reach the disk (O_DIRECT)."""
        return self._file.fileno()

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        written = 0
        while written < len(view):
            written += self._file.write(view[written:])
        return written

    def close(self) -> None:
        try:
            os.fsync(self._file.fileno())
        finally:
            self._file.close()


class _LocalStaging:
    def __init__(self, root: str, name: str) -> None:
        self._root = root
        self._name = name
        owner = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.path = os.path.join(root, STAGING_DIR, f"{name}.{owner}")
        os.makedirs(self.path)

    def open(self, relpath: str) -> Sink:
        full = os.path.join(self.path, relpath)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        return _LocalSink(full)

    def commit(self, manifest: bytes) -> None:
        sink = self.open(MANIFEST_NAME)
        try:
            sink.write(manifest)
        finally:
            sink.close()
        for folder, _dirs, _files in os.walk(self.path):
            _fsync_dir(folder)
        final = os.path.join(self._root, self._name)
        _make_room(final)
        os.rename(self.path, final)
        _fsync_dir(self._root)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _make_room(final: str) -> None:
    """Remove a leftover folder without manifest at the final name; refuse a committed one."""
    if not os.path.lexists(final):
        return
    if os.path.exists(os.path.join(final, MANIFEST_NAME)) or os.path.exists(os.path.join(final, QUARANTINE_NAME)):
        raise CheckpointExists(errno.EEXIST, f"{final} is already a committed checkpoint")
    shutil.rmtree(final)


class LocalBackend:
    """A run root on a local (POSIX) filesystem."""

    def __init__(self, location: Location) -> None:
        self.root = location.path

    def full(self, relpath: str) -> str:
        return os.path.join(self.root, relpath)

    def ensure_root(self) -> None:
        os.makedirs(os.path.join(self.root, STAGING_DIR), exist_ok=True)

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def scan(self) -> list[FolderEntry]:
        try:
            names = [e.name for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        entries = []
        for name in names:
            step = step_of_folder(name)
            if step is not None:
                try:
                    entries.append(self._entry(name, step))
                except FileNotFoundError:
                    pass  # deleted while we looked: not there
        return entries + self._quarantined()

    def _entry(self, name: str, step: int) -> FolderEntry:
        folder = os.path.join(self.root, name)
        manifest, error, modified = None, None, None
        try:
            with open(os.path.join(folder, MANIFEST_NAME), "rb") as f:
                manifest = f.read()
        except FileNotFoundError:
            error = "no manifest.json"
        except OSError as exc:
            error = f"manifest.json unreadable ({exc.strerror})"
        quarantined = os.path.exists(os.path.join(folder, QUARANTINE_NAME))
        if manifest is None:
            modified = _newest_mtime(folder)
        return FolderEntry(name, step, manifest, error, quarantined, modified)

    def file_sizes(self, folder: str) -> dict[str, int]:
        base = self.full(folder)
        sizes = {}
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                full = os.path.join(dirpath, f)
                sizes[os.path.relpath(full, base).replace(os.sep, "/")] = os.path.getsize(full)
        return sizes

    def open_read(self, relpath: str) -> BinaryIO:
        return open(self.full(relpath), "rb", buffering=0)

    def stage(self, name: str) -> Staging:
        final = self.full(name)
        if os.path.exists(os.path.join(final, MANIFEST_NAME)):
            raise CheckpointExists(errno.EEXIST, f"{final} is already a committed checkpoint")
        self.ensure_root()
        return _LocalStaging(self.root, name)

    def remove_folder(self, name: str) -> None:
        folder = self.full(name)
        try:
            os.unlink(os.path.join(folder, MANIFEST_NAME))
            _fsync_dir(folder)
        except FileNotFoundError:
            pass
        shutil.rmtree(folder, ignore_errors=True)
        if os.path.exists(folder):
            shutil.rmtree(folder)  # raise the real error if it is still there

    def quarantine(self, name: str, data: bytes) -> None:
        """Mark the folder, then move it aside into .quarantine/, so its step is free again."""
        folder = self.full(name)
        with open(os.path.join(folder, QUARANTINE_NAME), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        aside = os.path.join(self.root, QUARANTINE_DIR)
        os.makedirs(aside, exist_ok=True)
        os.rename(folder, os.path.join(aside, f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"))
        _fsync_dir(self.root)

    def _quarantined(self) -> list[FolderEntry]:
        try:
            names = os.listdir(os.path.join(self.root, QUARANTINE_DIR))
        except FileNotFoundError:
            return []
        steps = [(n, step_of_folder(n.split(".")[0])) for n in names]
        return [FolderEntry(f"{QUARANTINE_DIR}/{n}", step, None, None, True, None) for n, step in steps if step is not None]

    def list_staging(self) -> list[StagingEntry]:
        base = os.path.join(self.root, STAGING_DIR)
        try:
            names = os.listdir(base)
        except FileNotFoundError:
            return []
        host = socket.gethostname()
        out = []
        for name in names:
            path = os.path.join(base, name)
            try:
                modified = _newest_mtime(path)
            except FileNotFoundError:
                continue
            out.append(StagingEntry(f"{STAGING_DIR}/{name}", modified, _writer_alive(name, host)))
        # A ckpt-* folder without manifest is a half-deleted checkpoint: leftovers too.
        out += [StagingEntry(e.name, e.modified or 0.0, None)
                for e in self.scan() if e.manifest is None and not e.quarantined]
        return out

    def remove_staging(self, relpath: str) -> None:
        shutil.rmtree(self.full(relpath), ignore_errors=True)


def _writer_alive(staging_name: str, host: str) -> bool | None:
    """Whether the process that owns a staging folder still runs (None when unknowable)."""
    parts = staging_name.split(".")
    if len(parts) < 4 or not parts[-2].isdigit():
        return None
    writer_host, pid = ".".join(parts[1:-2]), int(parts[-2])
    if writer_host != host:
        return None
    return process_alive(pid)


def process_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def _newest_mtime(path: str) -> float:
    newest = os.lstat(path).st_mtime
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, f)).st_mtime)
            except FileNotFoundError:
                pass
    return newest
