"""A checkpoint being written: files checksummed as they stream by, and the commit (manifest last)."""
from __future__ import annotations

import contextlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from savegame.errors import CorruptCheckpoint
from savegame.storage.backends import Staging
from savegame.storage.checksum import Hasher
from savegame.storage.manifest import FileEntry, Manifest, check_payload_path, folder_name, parse_manifest, utc_now_iso
from savegame.storage.records import CheckpointInfo, mapped_errors

if TYPE_CHECKING:
    from savegame.storage.store import CheckpointStore

OVERLAP_MIN = 1 << 20  # below this, hashing inline costs less than handing the chunk to a thread


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
    """A checkpoint being written; invisible to readers until `commit`.

    Several processes (the ranks of one job) may write one checkpoint: the one that began it passes
    its `token` to the others, who `store.join(step, token)` and write their own files (a joined
    checkpoint never commits); the first `adopt`s what they report, then commits.
    """

    def __init__(self, store: "CheckpointStore", step: int, staging: Staging, joined: bool = False) -> None:
        self.store = store
        self.step = step
        self._staging = staging
        self._files: dict[str, FileEntry] = {}
        self._done = False
        self.joined = joined

    @property
    def token(self) -> str:
        """What another process needs to join this checkpoint (`CheckpointStore.join`)."""
        return self._staging.token

    @property
    def files(self) -> list[FileEntry]:
        """The files written (or adopted) so far, closed and checksummed."""
        return list(self._files.values())

    def adopt(self, entries: Iterable[FileEntry]) -> None:
        """Files another process wrote into this checkpoint (through `join`), listed in the manifest."""
        for entry in entries:
            check_payload_path(entry.path)
            if entry.path in self._files:
                raise ValueError(f"{entry.path} was written twice into step {self.step}")
            self._files[entry.path] = entry

    def open(self, relpath: str) -> HashingWriter:
        try:
            check_payload_path(relpath)  # the rule readers apply: never write what they would refuse
        except ValueError as exc:
            raise ValueError(f"{relpath!r} is not a valid payload file name: {exc}") from None
        with mapped_errors(f"{self.store.url}: cannot create {relpath}"):
            sink = self._staging.open(relpath)
        return _MappedWriter(sink, relpath, self._record, f"{self.store.url}: writing {relpath}")

    def _record(self, entry: FileEntry) -> None:
        self._files[entry.path] = entry

    def write_bytes(self, relpath: str, data: bytes | memoryview) -> None:
        with self.open(relpath) as f:
            f.write(data)

    def commit(self, *, epoch: int = 0, reason: str = "periodic", metrics: Mapping[str, float] | None = None,
               framework: str = "", run_id: str = "", resumed_from: int | None = None,
               created: str | None = None, world_size: int | None = None) -> CheckpointInfo:
        if self.joined:
            raise ValueError(f"step {self.step}: only the process that began a checkpoint commits it")
        manifest = Manifest(step=self.step, epoch=epoch, reason=reason, created=created or utc_now_iso(),
                            files=tuple(self._files[k] for k in sorted(self._files)),
                            metrics=dict(metrics or {}), framework=framework, run_id=run_id,
                            resumed_from=resumed_from, world_size=world_size)
        try:
            raw = manifest.to_json()
            parse_manifest(raw, folder_name(self.step))  # what readers would refuse is never written
        except (CorruptCheckpoint, ValueError) as exc:
            self.abort()
            raise ValueError(f"cannot commit step {self.step}: {exc}") from None
        try:
            with mapped_errors(f"{self.store.url}: committing step {self.step}"):
                self._staging.commit(raw)
        except BaseException:
            self.abort()
            raise
        self._done = True
        name = folder_name(self.step)
        return CheckpointInfo(manifest, name, self.store.path_of(name))

    def abort(self) -> None:
        """Drop what was staged; a joined checkpoint leaves that to the process that began it."""
        if not self._done:
            self._done = True
            if not self.joined:
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
        with mapped_errors(self._what):
            return super().write(data)

    def close(self) -> None:
        with mapped_errors(self._what):
            super().close()
