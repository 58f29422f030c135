"""The worker's snapshot segments: files in the daemon's private /dev/shm folder, at most two,
reused from save to save. A segment that no longer fits (the state grew) is replaced, never kept
beside a bigger one, so the memory stays at two state-sized segments.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from savegame.snapshot.layout import PAGE, STATUS_AT, SnapshotMeta, Status, pack_control, round_up
from savegame.worker.safetensors_io import buffer_address

MAX_SEGMENTS = 2
SLACK = 1 << 16  # room for state.json and the metrics to grow without a new segment


@dataclass
class Segment:
    path: str
    capacity: int
    fd: int
    buffer: mmap.mmap
    job: Any = None  # the save it holds while the daemon commits it
    handed_at: float = 0.0
    seq: int = field(default=0)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def status(self) -> Status:
        value = struct.unpack_from("<I", self.buffer, STATUS_AT)[0]
        return Status(value) if value in Status._value2member_map_ else Status.FAILED

    @property
    def address(self) -> int:
        """Where the segment's first byte is in this process' memory."""
        with memoryview(self.buffer) as view:
            return buffer_address(view) or 0

    def set_status(self, status: Status) -> None:
        struct.pack_into("<I", self.buffer, STATUS_AT, status)

    def close(self, unlink: bool = True) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.buffer.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        if unlink:
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def create_segment(folder: str, slot: int, capacity: int) -> Segment:
    """A new segment file of `capacity` bytes, its memory reserved now (posix_fallocate): a full
    /dev/shm is an error here, never a SIGBUS in the middle of a copy."""
    path = os.path.join(folder, f"seg-{os.getpid()}-{slot}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # ours, from an earlier save that did not fit
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.posix_fallocate(fd, 0, capacity)
        buffer = mmap.mmap(fd, capacity)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    pack_control(buffer, Status.FREE, 0, 0, capacity, PAGE, 0)
    return Segment(path, capacity, fd, buffer)


class SegmentSink:
    """Writes a file's bytes into a segment from `offset` on (what write_safetensors writes to).
    Bytes already in place (a capture copied straight into the segment) are not copied again."""

    def __init__(self, segment: Segment, offset: int, limit: Optional[int] = None) -> None:
        self._buffer = segment.buffer
        self._base = segment.address
        self.pos = offset
        self._limit = segment.capacity if limit is None else limit

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self.pos + view.nbytes > self._limit:
            raise ValueError(f"the file outgrows its room in the segment ({self._limit} bytes)")
        if buffer_address(view) != self._base + self.pos:
            self._buffer[self.pos:self.pos + view.nbytes] = view
        self.pos += view.nbytes
        return view.nbytes


def publish(segment: Segment, meta: SnapshotMeta, meta_offset: int, seq: int) -> None:
    """Write the meta and the control page, READY last: the daemon trusts nothing before it."""
    raw = meta.to_json()
    if meta_offset + len(raw) > segment.capacity:
        raise ValueError("the snapshot meta does not fit the segment")
    segment.buffer[meta_offset:meta_offset + len(raw)] = raw
    pack_control(segment.buffer, Status.FILLING, seq, meta.step, segment.capacity, meta_offset, len(raw))
    segment.set_status(Status.READY)


def capacity_for(required: int) -> int:
    return round_up(required + SLACK)


def find_slot(segments: list[Optional[Segment]]) -> Optional[int]:
    for index, segment in enumerate(segments):
        if segment is None:
            return index
    return None
