"""A snapshot segment's layout, shared by the worker (writer) and the daemon (reader).

    [0, PAGE)        control: magic, version, status, seq, step, capacity, meta offset, meta length
    [PAGE, ...)      the checkpoint's files, each a byte-exact image, each at a page-aligned offset
    meta             JSON: step, epoch, reason, metrics, framework, run_id, resumed_from and every
                     file's path, offset and length

Status moves FREE -> FILLING -> READY (the worker handed it over) -> COMMITTED | FAILED (the daemon,
or the worker when the daemon never answers; whoever commits holds the file's flock, see persist.py).
The daemon reads the segment with pread, never through a mapping: a hostile or dying worker that
truncates the file gives the daemon a short read (an error), never a SIGBUS. Everything read from a
segment is checked (bounds, lengths, JSON) before it is trusted. No pickles: JSON and raw bytes.
"""
from __future__ import annotations

import enum
import json
import re
import struct
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from savegame.errors import MalformedInput
from savegame.storage.manifest import MAX_STEP, REASONS, check_payload_path
from savegame.untrusted import field, finite_metrics, integer, items, load_json, obj, optional, text

PAGE = 4096
MAGIC = b"SGSEG\x00\x00\x01"
VERSION = 1
CONTROL = struct.Struct("<8sIIqqQQQ")  # magic, version, status, seq, step, capacity, meta offset, meta length
STATUS_AT = 12  # the status word: the one field both sides write
META_MAX = 1 << 20
MAX_FILES = 64
MAX_SEGMENT = 1 << 44  # 16 TiB: anything larger is not a snapshot
SEGMENT_NAME = re.compile(r"^seg-([0-9]{1,10})-([0-9]{1,3})$")  # seg-<worker pid>-<slot>


class Status(enum.IntEnum):
    FREE = 0
    FILLING = 1
    READY = 2
    COMMITTED = 3
    FAILED = 4


@dataclass(frozen=True)
class FileSpan:
    path: str
    offset: int
    length: int


@dataclass(frozen=True)
class SnapshotMeta:
    """What the daemon needs to commit a segment, besides its files' bytes."""

    step: int
    epoch: int
    reason: str
    metrics: Mapping[str, float]
    framework: str
    run_id: str
    resumed_from: Optional[int]
    files: tuple[FileSpan, ...]

    def to_json(self) -> bytes:
        data = asdict(self)
        data["metrics"] = dict(self.metrics)
        data["files"] = [asdict(f) for f in self.files]
        return json.dumps(data, allow_nan=False).encode()


@dataclass(frozen=True)
class Control:
    status: int
    seq: int
    step: int
    capacity: int
    meta_offset: int
    meta_length: int


def round_up(n: int, to: int = PAGE) -> int:
    return -(-n // to) * to


def pack_control(buffer: Any, status: Status, seq: int, step: int, capacity: int, meta_offset: int,
                 meta_length: int) -> None:
    CONTROL.pack_into(buffer, 0, MAGIC, VERSION, status, seq, step, capacity, meta_offset, meta_length)


def parse_control(raw: bytes, size: int) -> Control:
    """The control page of a segment file of `size` bytes, checked (MalformedInput otherwise)."""
    if len(raw) < CONTROL.size:
        raise MalformedInput("the segment is shorter than its control page")
    magic, version, status, seq, step, capacity, meta_offset, meta_length = CONTROL.unpack_from(raw, 0)
    if magic != MAGIC or version != VERSION:
        raise MalformedInput("not a savegame snapshot segment (magic or version)")
    if capacity != size or not 2 * PAGE <= size <= MAX_SEGMENT:
        raise MalformedInput(f"the segment says {capacity} bytes, its file holds {size}")
    if status not in Status._value2member_map_:
        raise MalformedInput(f"unknown segment status {status}")
    if not 0 <= step <= MAX_STEP:
        raise MalformedInput(f"step {step} out of range")
    if not 0 < meta_length <= META_MAX or not PAGE <= meta_offset <= capacity - meta_length:
        raise MalformedInput("the snapshot meta lies outside the segment")
    return Control(status, seq, step, capacity, meta_offset, meta_length)


def parse_meta(raw: bytes, control: Control) -> SnapshotMeta:
    """The meta JSON, checked strictly: every file lies inside the segment, between the control page
    and the meta, and no two overlap."""
    what = "snapshot meta"
    data = obj(load_json(raw, what=what, max_bytes=META_MAX, max_depth=4), what)

    def span(value: Any) -> FileSpan:
        entry = obj(value, f"{what} file")
        path = field(entry, "path", check_payload_path, what)
        offset = field(entry, "offset", integer(PAGE, control.meta_offset), what)
        length = field(entry, "length", integer(0, control.meta_offset - offset), what)
        return FileSpan(path, offset, length)

    files = tuple(field(data, "files", items(span, MAX_FILES), what))
    if not files or len({f.path for f in files}) != len(files):
        raise MalformedInput(f"{what}: no files, or a file listed twice")
    ordered = sorted(files, key=lambda f: f.offset)
    if any(a.offset + a.length > b.offset for a, b in zip(ordered, ordered[1:])):
        raise MalformedInput(f"{what}: files overlap")
    meta = SnapshotMeta(step=field(data, "step", integer(0, MAX_STEP), what),
                        epoch=field(data, "epoch", integer(0), what),
                        reason=field(data, "reason", text(32, REASONS), what),
                        metrics=field(data, "metrics", finite_metrics, what, default={}),
                        framework=field(data, "framework", text(64), what, default=""),
                        run_id=field(data, "run_id", text(256), what, default=""),
                        resumed_from=field(data, "resumed_from", optional(integer(0, MAX_STEP)), what,
                                           default=None),
                        files=files)
    if meta.step != control.step:
        raise MalformedInput(f"the snapshot meta says step {meta.step}, its control page {control.step}")
    return meta
