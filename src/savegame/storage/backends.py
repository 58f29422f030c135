"""Storage mechanism: how bytes reach local disk or object storage, and how a commit is made atomic.

Two commit strategies, chosen by the location:
- local disk: write into a staging folder on the same filesystem, fsync every file, write and fsync
  the manifest, rename the folder into place, fsync the parent;
- object storage (no rename): upload the payload under the final prefix, then write manifest.json
  last and create-only.
Paths given to a backend are relative to the run root and use '/'.
"""
from __future__ import annotations

import errno
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Protocol

from savegame.errors import CheckpointExists, StorageError
from savegame.storage.location import Location, open_filesystem
from savegame.storage.manifest import MANIFEST_NAME, step_of_folder

QUARANTINE_NAME = "QUARANTINE.json"
STAGING_DIR = ".staging"
QUARANTINE_DIR = ".quarantine"


@dataclass(frozen=True)
class FolderEntry:
    """A ckpt-* folder as found by a scan, before its manifest is parsed."""

    name: str
    step: int
    manifest: bytes | None  # None: no readable manifest.json
    read_error: str | None
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
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
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


class _ObjectSink:
    def __init__(self, fs: Any, path: str) -> None:
        self._file = fs.open(path, "wb", block_size=64 << 20)

    def write(self, data: bytes | memoryview) -> int:
        return self._file.write(memoryview(data).cast("B"))

    def close(self) -> None:
        self._file.close()


class _ObjectStaging:
    def __init__(self, backend: "ObjectBackend", name: str) -> None:
        self._backend = backend
        self._name = name
        self._written: list[str] = []

    def open(self, relpath: str) -> Sink:
        path = self._backend.full(f"{self._name}/{relpath}")
        self._written.append(path)
        return _ObjectSink(self._backend.fs, path)

    def commit(self, manifest: bytes) -> None:
        self._backend.put_create_only(f"{self._name}/{MANIFEST_NAME}", manifest)

    def abort(self) -> None:
        # Staging is the final prefix here: if another writer committed this step meanwhile,
        # these paths hold its payload now, and removing them would break a committed checkpoint.
        manifest = self._backend.full(f"{self._name}/{MANIFEST_NAME}")
        self._backend.fs.invalidate_cache(manifest)
        if self._backend.fs.exists(manifest):
            return
        for path in self._written:
            try:
                self._backend.fs.rm_file(path)
            except (FileNotFoundError, OSError):
                pass


class ObjectBackend:
    """A run root on an object store through fsspec (s3://, gs://, memory://, ...)."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.fs = open_filesystem(location)
        self.root = self.fs._strip_protocol(f"{location.protocol}://{location.path}").rstrip("/")

    def full(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def ensure_root(self) -> None:
        """Object stores have no folders to create."""

    def root_exists(self) -> bool:
        """Whether the bucket exists; other errors (credentials, options, network) propagate."""
        bucket = self.root.split("/", 1)[0] or self.root
        self.fs.invalidate_cache(bucket)
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            return False
        return True

    def _forget(self, path: str) -> None:
        """Drop the cached listings of `path` and of everything below it.

        invalidate_cache(path) keeps the listings below `path` (s3fs), and find() never replaces a
        cached listing: a folder listed once before another process committed it would then look
        torn (manifest listed, yet "not found") for as long as this filesystem object lives.
        """
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        prefix = path.rstrip("/") + "/"
        for key in [k for k in list(cache or ()) if k.startswith(prefix)]:
            cache.pop(key, None)

    def _walk_files(self) -> Iterator[tuple[str, dict[str, Any]]]:
        self._forget(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return
        prefix = self.root.rstrip("/") + "/"
        for path, info in found.items():
            if path.startswith(prefix) and info.get("type", "file") == "file":
                yield path[len(prefix):], info

    def scan(self) -> list[FolderEntry]:
        folders: dict[str, dict[str, Any]] = {}
        for rel, info in self._walk_files():
            name, _, inner = rel.partition("/")
            if not inner or step_of_folder(name) is None:
                continue
            seen = folders.setdefault(name, {"files": set(), "modified": 0.0})
            seen["files"].add(inner)
            seen["modified"] = max(seen["modified"], _info_mtime(info))
        wanted = [self.full(f"{n}/{MANIFEST_NAME}") for n, s in folders.items() if MANIFEST_NAME in s["files"]]
        contents = self.fs.cat(wanted, on_error="return") if wanted else {}
        if len(wanted) == 1 and not isinstance(contents, dict):
            contents = {wanted[0]: contents}
        entries = []
        for name, seen in folders.items():
            raw = contents.get(self.full(f"{name}/{MANIFEST_NAME}"))
            error = None
            if raw is None:
                error = "no manifest.json"
            elif isinstance(raw, BaseException):
                error, raw = f"manifest.json unreadable ({raw})", None
            modified = seen["modified"] if raw is None else None
            entries.append(FolderEntry(name, step_of_folder(name) or 0, raw, error,
                                       QUARANTINE_NAME in seen["files"], modified))
        return entries

    def file_sizes(self, folder: str) -> dict[str, int]:
        self.fs.invalidate_cache(self.full(folder))
        prefix = self.full(folder).rstrip("/") + "/"
        try:
            found = self.fs.find(self.full(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(prefix):]: int(i.get("size") or 0) for p, i in found.items() if p.startswith(prefix)}

    def open_read(self, relpath: str) -> BinaryIO:
        return self.fs.open(self.full(relpath), "rb", block_size=64 << 20, cache_type="readahead")

    def stage(self, name: str) -> Staging:
        self._forget(self.full(name))
        if self.fs.exists(self.full(f"{name}/{MANIFEST_NAME}")):
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{name} is already a committed checkpoint")
        return _ObjectStaging(self, name)

    def put_create_only(self, relpath: str, data: bytes) -> None:
        """Write a small object only if it does not exist (S3 If-None-Match: *)."""
        path = self.full(relpath)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{relpath} already exists") from None
        except (ValueError, NotImplementedError, TypeError):
            pass  # this backend has no exclusive create: check, then write
        if self.fs.exists(path):
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{relpath} already exists")
        self.fs.pipe_file(path, data)

    def remove_folder(self, name: str) -> None:
        try:
            self.fs.rm_file(self.full(f"{name}/{MANIFEST_NAME}"))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self.full(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.root)

    def quarantine(self, name: str, data: bytes) -> None:
        """Object stores cannot rename cheaply: a marker file takes the folder out of the listing."""
        self.fs.pipe_file(self.full(f"{name}/{QUARANTINE_NAME}"), data)

    def list_staging(self) -> list[StagingEntry]:
        """Object stores stage under the final name: a folder without manifest is the leftover."""
        return [StagingEntry(e.name, e.modified or 0.0, None)
                for e in self.scan() if e.manifest is None and not e.quarantined]

    def remove_staging(self, relpath: str) -> None:
        self.remove_folder(relpath)


def _info_mtime(info: dict[str, Any]) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return time.time()
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value)


def make_backend(location: Location) -> LocalBackend | ObjectBackend:
    return LocalBackend(location) if location.is_local else ObjectBackend(location)
