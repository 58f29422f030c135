"""What a framework adapter provides to the Checkpointer, and what it gets to restore from.

Call order, per save:   capture()  on the training thread (copy into reusable host buffers)
                        -> the Checkpointer writes Capture.blobs/state/files in the background
                        -> the next capture() only starts after that write has finished.
Per resume:             restore(reader) once, before training continues.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Optional, Protocol, Sequence, Union

from savegame.errors import CorruptCheckpoint, UnsupportedFormat
from savegame.snapshot.kept import KeptSnapshot
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.storage.checksum import Hasher, checksum_stream
from savegame.worker.safetensors_io import Allocate, TensorBlob, TensorInfo, TensorSpec, read_safetensors

TENSORS_FILE = "state.safetensors"
STATE_FILE = "state.json"
STATE_FORMAT = 1
UNSAFE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".npy", ".npz")


@dataclass(frozen=True)
class Reservation:
    """Memory a writer lends one capture: the tensors' bytes go there back to back, in the order they
    were asked for, already where the writer sends them from (a shared-memory segment, at their final
    offsets in state.safetensors), so nothing copies them a second time."""

    data: memoryview
    owner: Any  # the writer's own record of it (which segment)


# What a writer offers a capture (`capture_into(reserve)`): memory for these tensors, or None (use your own).
Reserve = Callable[[Sequence[TensorSpec]], Optional[Reservation]]


@dataclass
class Capture:
    """A snapshot of framework state, ready to be written without touching the live objects."""

    blobs: list[TensorBlob] = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # JSON-able
    # relpath -> a local file to copy in, or a function that the writer thread calls with the file's
    # sink to write its bytes in order (files built from the captured copies, e.g. Keras' .weights.h5)
    files: dict[str, Union[str, Callable[[Any], None]]] = field(default_factory=dict)
    # relpath -> at least how many bytes a file written by a function above will take (sizes its
    # shared-memory segment under the hand-over; a file that outgrows it is written in-process)
    file_bytes: dict[str, int] = field(default_factory=dict)
    cleanup: Optional[Callable[[], None]] = None  # run after the write (e.g. remove a temp folder)
    # Pipelining: the training thread runs `fill()` after the job is handed to the writer (the copy
    # into the blobs' buffers), and the writer calls `ready(n)` before writing data bytes [0, n).
    fill: Optional[Callable[[], None]] = None
    ready: Optional[Callable[[int], None]] = None
    # Captures that write and commit in their own way (the ranks of a job, each writing its part of
    # one checkpoint): the writer thread calls write(store, save_job) instead of writing the above.
    write: Optional[Callable[[CheckpointStore, Any], CheckpointInfo]] = None
    # The writer's memory the blobs were copied into (capture_into), in the blobs' order; the
    # writer frees it when the save is done, however it ends.
    reserved: Optional[Reservation] = None


class Owner(Protocol):
    """What an adapter may read from the Checkpointer it is bound to (`bind(owner)`), so adapters
    never import the Checkpointer module (which loads them)."""

    progress: Any  # savegame.worker.progress.Progress
    store: CheckpointStore
    epoch_length: Optional[int]


class Adapter(Protocol):
    framework: str

    def capture(self) -> Capture: ...

    # Optional: `capture_in_place() -> Capture` whose blobs point at the live state, for saves the
    # training loop waits out (emergency, final): no copy, no buffer to allocate.
    # Optional: `capture_into(reserve: Reserve) -> Capture`, capture() that copies into the memory
    # `reserve` lends (when it lends any) instead of buffers of its own.

    def restore(self, reader: "CheckpointReader") -> None: ...


class CheckpointReader:
    """Verified access to one checkpoint's payload: every byte handed out matches the manifest."""

    def __init__(self, store: CheckpointStore, info: CheckpointInfo, memory: Optional[KeptSnapshot] = None) -> None:
        self.store = store
        self.info = info
        self._memory = memory  # the same files kept in shared memory: read from there when it holds them
        self.from_memory = False  # True once a file was read from shared memory
        self._entries = {f.path: f for f in info.manifest.files}
        for path in self._entries:
            if path.endswith(UNSAFE_SUFFIXES):
                raise UnsupportedFormat(f"{info.path}: {path} may be a pickle; savegame never loads pickles")
        self.state = self._load_state()

    def has(self, relpath: str) -> bool:
        return relpath in self._entries

    def _entry(self, relpath: str) -> Any:
        if relpath not in self._entries:
            raise CorruptCheckpoint(f"{self.info.path}: {relpath} is not in the manifest")
        return self._entries[relpath]

    def read_bytes(self, relpath: str) -> bytes:
        entry = self._entry(relpath)
        with self._open(relpath, entry.bytes) as stream:
            data = stream.read()
        hasher = Hasher()
        hasher.update(data)
        if (hasher.bytes, hasher.digest()) != (entry.bytes, entry.checksum):
            raise CorruptCheckpoint(f"{self.info.path}: {relpath}: checksum mismatch: the file was altered or damaged")
        return data

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.read_bytes(STATE_FILE))
        except ValueError:
            raise CorruptCheckpoint(f"{self.info.path}: {STATE_FILE} is not valid JSON") from None
        if not isinstance(state, dict) or not isinstance(state.get("format"), int):
            raise CorruptCheckpoint(f"{self.info.path}: {STATE_FILE} has no format")
        if state["format"] > STATE_FORMAT:
            raise UnsupportedFormat(f"{self.info.path}: state format {state['format']} is newer than this "
                                    f"savegame reads ({STATE_FORMAT}); upgrade savegame")
        return state

    def read_tensors(self, allocate: Allocate, check: Optional[Callable[[list[TensorInfo]], None]] = None
                     ) -> dict[str, str]:
        """Stream state.safetensors into the buffers `allocate` gives, checking the checksum on the way.

        `check(infos)` sees every tensor's name, dtype and shape before any byte is read."""
        entry = self._entry(TENSORS_FILE)
        with self._open(TENSORS_FILE, entry.bytes) as stream:
            return read_safetensors(stream, allocate, f"{self.info.path}/{TENSORS_FILE}",
                                    expected=(entry.bytes, entry.checksum), check=check)

    def _open(self, relpath: str, length: int) -> BinaryIO:
        """The file from shared memory when kept there (checked like any other read), else from the store."""
        stream = self._memory.open_file(relpath, length) if self._memory is not None else None
        if stream is None:
            return self.store.open_file(self.info, relpath)
        self.from_memory = True
        return stream  # type: ignore[return-value]

    def verified_local_path(self, relpath: str) -> str:
        """A local path to a payload file after checking its checksum (local stores only)."""
        if not self.store.is_local:
            raise ValueError("verified_local_path needs a local store")
        entry = self._entry(relpath)
        path = os.path.join(self.info.path, relpath)
        with open(path, "rb", buffering=0) as stream:  # hashed as it streams: no copy of the file in memory
            if checksum_stream(stream) != (entry.bytes, entry.checksum):
                raise CorruptCheckpoint(f"{self.info.path}: {relpath}: checksum mismatch: the file was altered or damaged")
        return path

