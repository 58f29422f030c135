"""Local disk: staging folder, fsync of every file and the manifest, rename into place, fsync the parent.

Below the run root nothing is reached through a symlink (storage/localfs.py): a planted link can
neither be read through nor make savegame delete or move anything outside the run folder.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import socket
import stat
import time
import uuid
from typing import BinaryIO, Iterator, Optional

from savegame.errors import CheckpointExists, CorruptCheckpoint, MalformedInput, StorageError
from savegame.storage.backends import QUARANTINE_DIR, STAGING_DIR, FolderEntry, Sink, Staging, StagingEntry
from savegame.storage.localfs import (check_run_folder, file_sizes, fsync_dir, lexists, newest_mtime,  # noqa: F401
                                      opened_dir, read_manifest, real_subdir, remove_tree)
from savegame.storage.location import Location
from savegame.storage.manifest import MANIFEST_MAX, MANIFEST_NAME, QUARANTINE_NAME, step_of_folder
from savegame.storage.pids import parse_pid, process_alive  # noqa: F401 - process_alive is re-exported
from savegame.untrusted import open_regular_file


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
    def __init__(self, backend: "LocalBackend", name: str, joined: Optional[str] = None) -> None:
        """A new staging folder, or (`joined`: its token) one another process made."""
        self._backend = backend
        self._name = name
        owner = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._staged = joined or f"{name}.{owner}"
        with backend.root_fd() as root_fd:
            staging_fd = backend.staging_fd(root_fd, create=True)
            try:
                if joined is None:
                    os.mkdir(self._staged, 0o755, dir_fd=staging_fd)
                else:  # it must be a real folder of this step's staging, not a planted link
                    os.close(real_subdir(staging_fd, joined, os.path.join(STAGING_DIR, joined)) or _gone(joined))
            finally:
                os.close(staging_fd)
        self.path = os.path.join(backend.root, STAGING_DIR, self._staged)
        self.token = self._staged

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
            fsync_dir(folder)
        with self._backend.root_fd() as root_fd:
            staging_fd = self._backend.staging_fd(root_fd)
            try:
                _make_room(root_fd, self._name)
                _rename_into_place(staging_fd, self._staged, root_fd, self._name)
            finally:
                os.close(staging_fd)
            os.fsync(root_fd)

    def abort(self) -> None:
        with contextlib.suppress(OSError), self._backend.root_fd() as root_fd:
            staging_fd = self._backend.staging_fd(root_fd)
            try:
                remove_tree(self._staged, staging_fd)
            finally:
                os.close(staging_fd)


def _rename_into_place(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):  # another writer renamed its copy first
            raise CheckpointExists(errno.EEXIST, f"{dst} is already a committed checkpoint") from None
        raise


def _make_room(root_fd: int, name: str) -> None:
    """Remove a leftover folder without manifest at the final name; refuse anything else."""
    try:
        info = os.lstat(name, dir_fd=root_fd)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise StorageError(errno.EEXIST, f"{name} exists and is not a checkpoint folder (a file or a symbolic "
                                         "link); move it out of the run folder")
    with opened_dir(name, root_fd) as folder_fd:
        if lexists(MANIFEST_NAME, folder_fd) or lexists(QUARANTINE_NAME, folder_fd):
            raise CheckpointExists(errno.EEXIST, f"{name} is already a committed checkpoint")
    remove_tree(name, root_fd)


class LocalBackend:
    """A run root on a local (POSIX) filesystem."""

    def __init__(self, location: Location) -> None:
        self.root = location.path

    def full(self, relpath: str) -> str:
        return os.path.join(self.root, relpath)

    @contextlib.contextmanager
    def root_fd(self) -> Iterator[int]:
        """The run root (it may itself be a symlink: check_run_folder decides whether that is fine)."""
        with opened_dir(self.root, follow=True) as fd:
            yield fd

    def staging_fd(self, root_fd: int, create: bool = False) -> int:
        fd = real_subdir(root_fd, STAGING_DIR, self.full(STAGING_DIR), create=create)
        if fd is None:
            raise FileNotFoundError(errno.ENOENT, "no staging folder", self.full(STAGING_DIR))
        return fd

    def ensure_root(self) -> None:
        os.makedirs(self.root, mode=0o750, exist_ok=True)  # never writable by others (check_run_folder)
        with self.root_fd() as root_fd:
            os.close(self.staging_fd(root_fd, create=True))

    def root_exists(self) -> bool:
        return os.path.isdir(self.root)

    def scan(self) -> list[FolderEntry]:
        try:
            with self.root_fd() as root_fd:
                names = [e.name for e in os.scandir(root_fd) if e.is_dir(follow_symlinks=False)]
                entries = [self._entry(root_fd, n, s) for n in names if (s := step_of_folder(n)) is not None]
                return [e for e in entries if e is not None] + self._quarantined(root_fd)
        except FileNotFoundError:
            return []

    def _entry(self, root_fd: int, name: str, step: int) -> FolderEntry | None:
        try:
            with opened_dir(name, root_fd) as folder_fd:
                manifest, missing, error = read_manifest(folder_fd, MANIFEST_NAME, MANIFEST_MAX)
                quarantined = lexists(QUARANTINE_NAME, folder_fd)
                modified = newest_mtime(".", folder_fd) if missing else None
        except FileNotFoundError:
            return None  # deleted while we looked: not there
        except OSError as exc:  # the folder itself cannot be read (EACCES, EIO, replaced by a link)
            return FolderEntry(name, step, None, f"folder unreadable ({exc.strerror or exc})", False, False, None)
        return FolderEntry(name, step, manifest, error, missing, quarantined, modified)

    def file_sizes(self, folder: str) -> dict[str, int | None]:
        with self.root_fd() as root_fd:
            if stat.S_ISLNK(os.lstat(folder, dir_fd=root_fd).st_mode):
                return {}
            return file_sizes(folder, root_fd)

    def open_read(self, relpath: str) -> BinaryIO:
        """A payload file, opened without following any symlink below the run root; only a regular
        file is read (a FIFO or a device would block or never end)."""
        try:
            return open_regular_file(self.root, relpath)
        except MalformedInput as exc:
            raise CorruptCheckpoint(f"{self.full(relpath)}: {str(exc).split(': ', 1)[-1]}") from None

    def stage(self, name: str) -> Staging:
        self.ensure_root()
        with self.root_fd() as root_fd:
            _refuse_committed(root_fd, name)
        return _LocalStaging(self, name)

    def join(self, name: str, token: str) -> Staging:
        """The staging folder `token` (from another process's `stage(name)`), to write files into."""
        if not _STAGED_NAME.fullmatch(token) or not token.startswith(name + "."):
            raise StorageError(errno.EINVAL, f"{token[:80]!r} is not a staging folder of {name}")
        return _LocalStaging(self, name, joined=token)

    def remove_folder(self, name: str) -> None:
        """Delete a checkpoint folder: manifest first (and synced), then the rest, links never followed."""
        with self.root_fd() as root_fd:
            try:
                folder_fd = real_subdir(root_fd, name, self.full(name))
            except StorageError:
                raise StorageError(errno.ELOOP, f"{self.full(name)} is a symbolic link or not a folder; "
                                                "not deleting what it points to") from None
            if folder_fd is None:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(MANIFEST_NAME, dir_fd=folder_fd)
                    os.fsync(folder_fd)
            finally:
                os.close(folder_fd)
            remove_tree(name, root_fd)

    def quarantine(self, name: str, data: bytes) -> None:
        """Mark the folder, then move it aside into .quarantine/, so its step is free again."""
        with self.root_fd() as root_fd:
            aside_fd = real_subdir(root_fd, QUARANTINE_DIR, self.full(QUARANTINE_DIR), create=True)
            assert aside_fd is not None
            try:
                with opened_dir(name, root_fd) as folder_fd:
                    _write_synced(folder_fd, QUARANTINE_NAME, data)
                aside = f"{name}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"
                os.rename(name, aside, src_dir_fd=root_fd, dst_dir_fd=aside_fd)
                os.fsync(aside_fd)
            finally:
                os.close(aside_fd)
            os.fsync(root_fd)

    def _quarantined(self, root_fd: int) -> list[FolderEntry]:
        try:
            aside_fd = real_subdir(root_fd, QUARANTINE_DIR, self.full(QUARANTINE_DIR))
        except StorageError:
            return []  # a symlink: not ours, never followed
        if aside_fd is None:
            return []
        try:
            names = os.listdir(aside_fd)
        finally:
            os.close(aside_fd)
        steps = [(n, step_of_folder(n.split(".")[0])) for n in names]
        return [FolderEntry(f"{QUARANTINE_DIR}/{n}", step, None, None, False, True, None)
                for n, step in steps if step is not None]

    def list_staging(self) -> list[StagingEntry]:
        """The folders in .staging/ (a symlinked .staging is refused: StorageError)."""
        host = socket.gethostname()
        with self.root_fd() as root_fd:
            staging_fd = real_subdir(root_fd, STAGING_DIR, self.full(STAGING_DIR))
            if staging_fd is None:
                return []
            try:
                out = []
                for entry in os.scandir(staging_fd):
                    if not entry.is_dir(follow_symlinks=False):
                        continue  # not a folder savegame made: left alone
                    with contextlib.suppress(FileNotFoundError):
                        out.append(StagingEntry(f"{STAGING_DIR}/{entry.name}", newest_mtime(entry.name, staging_fd),
                                                _writer_alive(entry.name, host)))
                return out
            finally:
                os.close(staging_fd)

    def remove_leftover(self, relpath: str) -> None:
        """Remove a staging folder, or a ckpt-* folder whose manifest is really absent (checked again
        now: it may have been committed since it was listed)."""
        with self.root_fd() as root_fd:
            if relpath.startswith(STAGING_DIR + "/"):
                staging_fd = self.staging_fd(root_fd)
                try:
                    remove_tree(relpath[len(STAGING_DIR) + 1:], staging_fd)
                finally:
                    os.close(staging_fd)
                return
            _make_room(root_fd, relpath)


_STAGED_NAME = re.compile(r"ckpt-[0-9]{12}\.[A-Za-z0-9_.-]{1,255}\.[0-9]{1,10}\.[0-9a-f]{8}")


def _gone(token: str) -> int:
    raise FileNotFoundError(errno.ENOENT, f"the staging folder {token} is gone (its writer aborted the save)")


def _write_synced(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_committed(root_fd: int, name: str) -> None:
    """CheckpointExists when `name` holds a committed (or quarantined, or unreadable) checkpoint."""
    try:
        with opened_dir(name, root_fd) as folder_fd:
            taken = lexists(MANIFEST_NAME, folder_fd) or lexists(QUARANTINE_NAME, folder_fd)
    except FileNotFoundError:
        return
    except OSError as exc:  # a link, a file, or unreadable: never replaced
        raise CheckpointExists(errno.EEXIST, f"{name} is in the way ({exc.strerror or exc}: a symbolic link, a "
                                             "file or an unreadable folder); move it out of the run folder") from None
    if taken:
        raise CheckpointExists(errno.EEXIST, f"{name} is already a committed checkpoint")


def _writer_alive(staging_name: str, host: str) -> bool | None:
    """Whether the process that owns a staging folder still runs (None when unknowable)."""
    parts = staging_name.split(".")
    if len(parts) < 4:
        return None
    writer_host, pid = ".".join(parts[1:-2]), parse_pid(parts[-2])
    if writer_host != host or pid is None:
        return None
    return process_alive(pid)
