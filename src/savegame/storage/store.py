"""A checkpoint store over a run root: the primitives everything else is built from.

Call order for a save (the only way a checkpoint comes into being):
    staged = store.begin(step)           # nothing visible yet
    with staged.open("model.safetensors") as f: f.write(...)   # checksummed while written
    info = staged.commit(epoch=..., reason=...)   # manifest last: now it is listed
Readers only ever see committed checkpoints: `list()` returns those, sorted by step.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, BinaryIO, Callable, Iterator, Mapping

from savegame.errors import Cancelled, CheckpointNotFound, CorruptCheckpoint, SavegameError, StorageError
from savegame.storage.backends import FolderEntry, Staging, make_backend, storage_error
from savegame.storage.checksum import CHUNK, Hasher, checksum_stream, is_supported
from savegame.storage.location import Location, parse_location
from savegame.storage.manifest import (FileEntry, Manifest, folder_name, parse_manifest,
                                       utc_now_iso)

DEFAULT_STALE_AFTER_S = 3600.0
OVERLAP_MIN = 1 << 20  # below this, hashing inline costs less than handing the chunk to a thread


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint: its manifest and where it lives."""

    manifest: Manifest
    name: str
    path: str

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def epoch(self) -> int:
        return self.manifest.epoch

    @property
    def reason(self) -> str:
        return self.manifest.reason

    @property
    def metrics(self) -> Mapping[str, float]:
        return self.manifest.metrics

    @property
    def created(self) -> datetime:
        return self.manifest.created_at

    @property
    def bytes(self) -> int:
        return self.manifest.total_bytes


@dataclass(frozen=True)
class Problem:
    """A folder that is not a usable checkpoint, and why."""

    name: str
    step: int
    problem: str


@dataclass(frozen=True)
class Scan:
    committed: list[CheckpointInfo]
    damaged: list[Problem] = field(default_factory=list)  # manifest unreadable, garbled, or too new
    incomplete: list[Problem] = field(default_factory=list)  # no manifest: never committed
    quarantined: list[Problem] = field(default_factory=list)


@contextlib.contextmanager
def _mapped(what: str) -> Iterator[None]:
    """Map any backend error to StorageError at the boundary."""
    try:
        yield
    except SavegameError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: botocore, aiohttp, OSError, ...
        raise storage_error(exc, what) from exc


class HashingWriter:
    """A file being written into a staged checkpoint; its checksum is computed as bytes pass."""

    def __init__(self, sink: Any, relpath: str, on_close: Any) -> None:
        self._sink = sink
        self._relpath = relpath
        self._hasher = Hasher()
        self._on_close = on_close
        self._closed = False
        self._helper: ThreadPoolExecutor | None = None

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes < OVERLAP_MIN:
            self._hasher.update(view)
            self._sink.write(view)
            return view.nbytes
        # Hash on a helper thread while this one writes (xxh3 releases the GIL), so the checksum
        # adds no time to a save. Both finish before returning: the caller may reuse the buffer.
        if self._helper is None:
            self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-checksum")
        hashed = self._helper.submit(self._hasher.update, view)
        try:
            self._sink.write(view)
        finally:
            hashed.result()
        return view.nbytes

    def fileno(self) -> int:
        """The local file's descriptor; io.UnsupportedOperation on object storage."""
        fileno = getattr(self._sink, "fileno", None)
        if fileno is None:
            raise io.UnsupportedOperation("not a local file")
        return int(fileno())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._helper is not None:
                self._helper.shutdown()
            self._sink.close()
            self._on_close(FileEntry(self._relpath, self._hasher.bytes, self._hasher.digest()))

    def __enter__(self) -> "HashingWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StagedCheckpoint:
    """A checkpoint being written; invisible to readers until `commit`."""

    def __init__(self, store: "CheckpointStore", step: int, staging: Staging) -> None:
        self.store = store
        self.step = step
        self._staging = staging
        self._files: dict[str, FileEntry] = {}
        self._done = False

    def open(self, relpath: str) -> HashingWriter:
        if relpath == "manifest.json" or relpath.startswith(("/", "..")):
            raise ValueError(f"{relpath!r} is not a valid payload file name")
        with _mapped(f"{self.store.url}: cannot create {relpath}"):
            sink = self._staging.open(relpath)
        return _MappedWriter(sink, relpath, self._record, f"{self.store.url}: writing {relpath}")

    def _record(self, entry: FileEntry) -> None:
        self._files[entry.path] = entry

    def write_bytes(self, relpath: str, data: bytes | memoryview) -> None:
        with self.open(relpath) as f:
            f.write(data)

    def commit(self, *, epoch: int = 0, reason: str = "periodic", metrics: Mapping[str, float] | None = None,
               framework: str = "", run_id: str = "", resumed_from: int | None = None,
               created: str | None = None) -> CheckpointInfo:
        manifest = Manifest(step=self.step, epoch=epoch, reason=reason, created=created or utc_now_iso(),
                            files=tuple(self._files[k] for k in sorted(self._files)),
                            metrics=dict(metrics or {}), framework=framework, run_id=run_id,
                            resumed_from=resumed_from)
        try:
            with _mapped(f"{self.store.url}: committing step {self.step}"):
                self._staging.commit(manifest.to_json())
        except BaseException:
            self.abort()
            raise
        self._done = True
        name = folder_name(self.step)
        return CheckpointInfo(manifest, name, self.store.path_of(name))

    def abort(self) -> None:
        if not self._done:
            self._done = True
            with contextlib.suppress(Exception):
                self._staging.abort()

    def __enter__(self) -> "StagedCheckpoint":
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


class _MappedWriter(HashingWriter):
    def __init__(self, sink: Any, relpath: str, on_close: Any, what: str) -> None:
        super().__init__(sink, relpath, on_close)
        self._what = what

    def write(self, data: bytes | memoryview) -> int:
        with _mapped(self._what):
            return super().write(data)

    def close(self) -> None:
        with _mapped(self._what):
            super().close()


class CheckpointStore:
    """Committed checkpoints under one run root (a local folder or an fsspec URL)."""

    def __init__(self, url: str | Location, storage_options: Mapping[str, Any] | None = None) -> None:
        self.location = url if isinstance(url, Location) else parse_location(url, storage_options)
        self.url = self.location.url
        with _mapped(f"{self.url}: cannot open"):
            self._backend = make_backend(self.location)

    @property
    def is_local(self) -> bool:
        return self.location.is_local

    def path_of(self, name: str) -> str:
        """Where a checkpoint folder lives: a local path, or a URL."""
        if self.is_local:
            return self._backend.full(name)
        return f"{self.location.protocol}://{self._backend.full(name)}"

    def exists(self) -> bool:
        with _mapped(f"{self.url}: cannot reach"):
            return self._backend.root_exists()

    def scan(self) -> Scan:
        with _mapped(f"{self.url}: cannot list"):
            entries = self._backend.scan()
        committed, damaged, incomplete, quarantined = [], [], [], []
        for entry in entries:
            if entry.quarantined:
                quarantined.append(Problem(entry.name, entry.step, "quarantined"))
            elif entry.manifest is None:
                bucket = incomplete if entry.read_error == "no manifest.json" else damaged
                bucket.append(Problem(entry.name, entry.step, entry.read_error or "no manifest.json"))
            else:
                parsed = self._parse(entry)
                if isinstance(parsed, Problem):
                    damaged.append(parsed)
                else:
                    committed.append(parsed)
        key = lambda item: item.step  # noqa: E731
        return Scan(sorted(committed, key=key), sorted(damaged, key=key),
                    sorted(incomplete, key=key), sorted(quarantined, key=key))

    def _parse(self, entry: FolderEntry) -> CheckpointInfo | Problem:
        try:
            manifest = parse_manifest(entry.manifest or b"", entry.name)
        except CorruptCheckpoint as exc:
            return Problem(entry.name, entry.step, str(exc).split(": ", 1)[-1])
        if manifest.step != entry.step:
            return Problem(entry.name, entry.step, f"manifest says step {manifest.step}, folder says {entry.step}")
        return CheckpointInfo(manifest, entry.name, self.path_of(entry.name))

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest step first. Reads manifests only, never payloads."""
        return self.scan().committed

    def get(self, step: int) -> CheckpointInfo:
        for info in self.list():
            if info.step == step:
                return info
        raise CheckpointNotFound(f"{self.url}: no committed checkpoint at step {step}")

    def latest(self) -> CheckpointInfo | None:
        committed = self.list()
        return committed[-1] if committed else None

    def begin(self, step: int) -> StagedCheckpoint:
        name = folder_name(step)
        with _mapped(f"{self.url}: cannot start checkpoint {name}"):
            staging = self._backend.stage(name)
        return StagedCheckpoint(self, step, staging)

    def open_file(self, info: CheckpointInfo, relpath: str) -> BinaryIO:
        with _mapped(f"{info.path}: cannot open {relpath}"):
            return self._backend.open_read(f"{info.name}/{relpath}")

    def verify(self, info: CheckpointInfo) -> list[str]:
        """Problems found in one committed checkpoint (empty: every file's size and checksum match)."""
        with _mapped(f"{info.path}: cannot verify"):
            sizes = self._backend.file_sizes(info.name)
        problems = []
        for entry in info.manifest.files:
            problem = self._check_file(info, entry, sizes.get(entry.path))
            if problem:
                problems.append(f"{entry.path}: {problem}")
        return problems

    def _check_file(self, info: CheckpointInfo, entry: FileEntry, size: int | None) -> str | None:
        if size is None:
            return "missing"
        if size != entry.bytes:
            return f"{size} bytes, the manifest says {entry.bytes} ({'truncated' if size < entry.bytes else 'grown'})"
        if not is_supported(entry.checksum):
            return f"unknown checksum {entry.checksum.split(':')[0]!r}"
        try:
            with self.open_file(info, entry.path) as stream:
                size, checksum = checksum_stream(stream)
        except StorageError as exc:
            return f"unreadable ({exc})"
        if checksum != entry.checksum:
            return "checksum mismatch: the file was altered or damaged"
        return None

    def delete(self, step: int) -> None:
        """Remove a checkpoint, manifest first, so a half-deleted one is never listed."""
        name = folder_name(step)
        with _mapped(f"{self.url}: cannot delete {name}"):
            self._backend.remove_folder(name)

    def quarantine(self, step: int, reason: str) -> None:
        """Set a damaged checkpoint aside: never resumed from, never deleted by retention, kept to inspect.

        Local disk moves it into .quarantine/ (freeing its step for a good copy); object stores mark it.
        """
        name = folder_name(step)
        marker = json.dumps({"reason": reason, "time": utc_now_iso()}).encode()
        with _mapped(f"{self.url}: cannot quarantine {name}"):
            self._backend.quarantine(name, marker)

    def collect_garbage(self, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                        now: float | None = None) -> list[str]:
        """Remove leftovers of saves that never committed; returns what was removed.

        A leftover goes when its writer is known dead (same host) or it is older than `stale_after_s`.
        """
        now = time.time() if now is None else now
        removed = []
        with _mapped(f"{self.url}: cannot collect stale staging"):
            for entry in self._backend.list_staging():
                if entry.writer_alive is False or now - entry.modified >= stale_after_s:
                    self._backend.remove_staging(entry.path)
                    removed.append(entry.path)
        return removed


def copy_checkpoint(source: CheckpointStore, info: CheckpointInfo, dest: CheckpointStore,
                    cancelled: Callable[[], bool] = lambda: False) -> CheckpointInfo:
    """Copy one committed checkpoint to another store, verifying every byte on the way; manifest last.

    `cancelled()` is asked between chunks: when it says so, the copy is aborted (Cancelled)."""
    staged = dest.begin(info.step)
    with staged:
        for entry in info.manifest.files:
            _copy_file(source, info, entry, staged, cancelled)
        manifest = info.manifest
        return staged.commit(epoch=manifest.epoch, reason=manifest.reason, metrics=manifest.metrics,
                             framework=manifest.framework, run_id=manifest.run_id,
                             resumed_from=manifest.resumed_from, created=manifest.created)


def _copy_file(source: CheckpointStore, info: CheckpointInfo, entry: FileEntry, staged: StagedCheckpoint,
               cancelled: Callable[[], bool]) -> None:
    checked = Hasher()
    with source.open_file(info, entry.path) as src, staged.open(entry.path) as dst:
        with _mapped(f"{info.path}: reading {entry.path}"):
            while True:
                if cancelled():
                    raise Cancelled(f"copying {info.path} to {staged.store.url} was cancelled")
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                checked.update(chunk)
                dst.write(chunk)
    if checked.bytes != entry.bytes or checked.digest() != entry.checksum:
        raise CorruptCheckpoint(f"{info.path}: {entry.path} does not match its manifest; not copied")
