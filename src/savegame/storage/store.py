"""A checkpoint store over a run root: the primitives everything else is built from.

Call order for a save (the only way a checkpoint comes into being):
    staged = store.begin(step)           # nothing visible yet
    with staged.open("model.safetensors") as f: f.write(...)   # checksummed while written
    info = staged.commit(epoch=..., reason=...)   # manifest last: now it is listed
Readers only ever see committed checkpoints: `list()` returns those, sorted by step.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any, BinaryIO, Callable, Mapping

from savegame.errors import Cancelled, CheckpointNotFound, CorruptCheckpoint, StorageError
from savegame.storage.backends import FolderEntry, StagingEntry
from savegame.storage.factory import make_backend
from savegame.storage.checksum import CHUNK, Hasher, checksum_stream, is_supported
from savegame.storage.location import Location, parse_location
from savegame.storage.manifest import FileEntry, folder_name, parse_manifest, utc_now_iso
from savegame.storage.records import CheckpointInfo, Problem, Scan, mapped_errors
from savegame.storage.staged import HashingWriter, StagedCheckpoint

__all__ = ["CheckpointInfo", "CheckpointStore", "HashingWriter", "Problem", "Scan", "StagedCheckpoint",
           "copy_checkpoint"]
log = logging.getLogger("savegame")

DEFAULT_STALE_AFTER_S = 3600.0


class CheckpointStore:
    """Committed checkpoints under one run root (a local folder or an fsspec URL)."""

    def __init__(self, url: str | Location, storage_options: Mapping[str, Any] | None = None) -> None:
        self.location = url if isinstance(url, Location) else parse_location(url, storage_options)
        self.url = self.location.url
        with mapped_errors(f"{self.url}: cannot open"):
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
        with mapped_errors(f"{self.url}: cannot reach"):
            return self._backend.root_exists()

    def scan(self) -> Scan:
        with mapped_errors(f"{self.url}: cannot list"):
            entries = self._backend.scan()
        committed, damaged, incomplete, quarantined = [], [], [], []
        for entry in entries:
            if entry.quarantined:
                quarantined.append(Problem(entry.name, entry.step, "quarantined"))
            elif entry.manifest is None:  # only a really absent manifest is "incomplete"; unreadable is damage
                bucket = incomplete if entry.missing else damaged
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

    def write_index(self) -> bool:
        """Object stores: rewrite the manifest index (storage/manifestindex.py) from a fresh listing, so
        cold listings read one object; True when it changed. Local folders have none (False)."""
        with mapped_errors(f"{self.url}: cannot write the manifest index"):
            return self._backend.write_index() if not self.is_local else False

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
        with mapped_errors(f"{self.url}: cannot start checkpoint {name}"):
            staging = self._backend.stage(name)
        return StagedCheckpoint(self, step, staging)

    def join(self, step: int, token: str) -> StagedCheckpoint:
        """Write files into a checkpoint another process began (`StagedCheckpoint.token`); that process
        lists them in its manifest (`adopt`) and commits. Used by the ranks of a multi-process job."""
        name = folder_name(step)
        with mapped_errors(f"{self.url}: cannot join checkpoint {name}"):
            staging = self._backend.join(name, token)
        return StagedCheckpoint(self, step, staging, joined=True)

    def open_file(self, info: CheckpointInfo, relpath: str) -> BinaryIO:
        with mapped_errors(f"{info.path}: cannot open {relpath}"):
            return self._backend.open_read(f"{info.name}/{relpath}")

    def verify(self, info: CheckpointInfo) -> list[str]:
        """Problems found in one committed checkpoint (empty: every file's size and checksum match)."""
        with mapped_errors(f"{info.path}: cannot verify"):
            sizes = self._backend.file_sizes(info.name)
        problems = []
        for entry in info.manifest.files:
            problem = self._check_file(info, entry, sizes)
            if problem:
                problems.append(f"{entry.path}: {problem}")
        return problems

    def _check_file(self, info: CheckpointInfo, entry: FileEntry, sizes: Mapping[str, int | None]) -> str | None:
        if entry.path not in sizes:
            return "missing"
        size = sizes[entry.path]
        if size is None:
            return "not a regular file (a symbolic link, FIFO or device); not read"
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
        with mapped_errors(f"{self.url}: cannot delete {name}"):
            self._backend.remove_folder(name)

    def quarantine(self, step: int, reason: str) -> None:
        """Set a damaged checkpoint aside: never resumed from, never deleted by retention, kept to inspect.

        Local disk moves it into .quarantine/ (freeing its step for a good copy); object stores mark it.
        """
        name = folder_name(step)
        marker = json.dumps({"reason": reason, "time": utc_now_iso()}).encode()
        with mapped_errors(f"{self.url}: cannot quarantine {name}"):
            self._backend.quarantine(name, marker)

    def garbage(self, stale_after_s: float = DEFAULT_STALE_AFTER_S, now: float | None = None) -> list[str]:
        """What `collect_garbage` would remove now (nothing is removed).

        The one place that decides which uncommitted leftovers may go: a staging folder, or a ckpt-*
        folder whose manifest is really absent (never an unreadable or invalid one: that is damage),
        once its writer is known dead (same host) or it is older than `stale_after_s`.
        """
        now = time.time() if now is None else now
        with mapped_errors(f"{self.url}: cannot list stale staging"):
            try:
                entries, staging = self._backend.scan(), self._backend.list_staging()
            except FileNotFoundError:
                return []  # no run folder yet: nothing to collect
            leftovers = staging + [StagingEntry(e.name, e.modified or 0.0, None) for e in entries
                                   if e.missing and e.manifest is None and not e.quarantined]
        return [e.path for e in leftovers if e.writer_alive is False or now - e.modified >= stale_after_s]

    def collect_garbage(self, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                        now: float | None = None) -> list[str]:
        """Remove leftovers of saves that never committed (see `garbage`); returns what was removed.

        Each is checked again right before it goes: a folder committed meanwhile stays.
        """
        removed = []
        for path in self.garbage(stale_after_s, now):
            try:
                with mapped_errors(f"{self.url}: cannot remove the leftover {path}"):
                    self._backend.remove_leftover(path)
            except StorageError as exc:
                log.warning("%s", exc.strerror or exc)
                continue
            removed.append(path)
        return removed


def copy_checkpoint(source: CheckpointStore, info: CheckpointInfo, dest: CheckpointStore,
                    cancelled: Callable[[], bool] = lambda: False,
                    progress: Callable[[int], None] = lambda n: None) -> CheckpointInfo:
    """Copy one committed checkpoint to another store, verifying every byte on the way; manifest last.

    `cancelled()` is asked between chunks: when it says so, the copy is aborted (Cancelled).
    `progress(n)` is told each chunk's size (a progress bar)."""
    staged = dest.begin(info.step)
    with staged:
        for entry in info.manifest.files:
            _copy_file(source, info, entry, staged, cancelled, progress)
        manifest = info.manifest
        return staged.commit(epoch=manifest.epoch, reason=manifest.reason, metrics=manifest.metrics,
                             framework=manifest.framework, run_id=manifest.run_id,
                             resumed_from=manifest.resumed_from, created=manifest.created,
                             world_size=manifest.world_size)


def _copy_file(source: CheckpointStore, info: CheckpointInfo, entry: FileEntry, staged: StagedCheckpoint,
               cancelled: Callable[[], bool], progress: Callable[[int], None]) -> None:
    checked = Hasher()
    with source.open_file(info, entry.path) as src, staged.open(entry.path) as dst:
        with mapped_errors(f"{info.path}: reading {entry.path}"):
            while checked.bytes <= entry.bytes:  # a file longer than its manifest says is not read to its end
                if cancelled():
                    raise Cancelled(f"copying {info.path} to {staged.store.url} was cancelled")
                chunk = src.read(CHUNK)
                if not chunk:
                    break
                checked.update(chunk)
                dst.write(chunk)
                progress(len(chunk))
    if checked.bytes != entry.bytes or checked.digest() != entry.checksum:
        raise CorruptCheckpoint(f"{info.path}: {entry.path} does not match its manifest; not copied")
