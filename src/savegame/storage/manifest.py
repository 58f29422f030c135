"""The manifest: the one file whose presence makes a folder a committed checkpoint."""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from savegame.errors import CorruptCheckpoint, MalformedInput, UnsupportedFormat
from savegame.untrusted import (MAX_SAFE_INT, field, finite_metrics, integer, items, load_json, obj, optional,
                                relative_path, text)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
QUARANTINE_NAME = "QUARANTINE.json"
CLAIM_NAME = ".savegame-writer.json"  # object stores: who is writing this step (created create-only)
RESERVED_NAMES = (MANIFEST_NAME, QUARANTINE_NAME, CLAIM_NAME)  # never payload files
REASONS = ("periodic", "best", "emergency", "final", "manual")
MANIFEST_MAX = 16 << 20  # bytes: 100,000 file entries fit; a larger manifest is damage, never read whole
MANIFEST_DEPTH = 8  # the format nests 3 deep; some room for what later versions add
MAX_FILES = 100_000
MAX_FILE_BYTES = 1 << 50  # 1 PiB per file
MAX_STEP = 10**12 - 1  # what the 12-digit folder name holds
MAX_WORLD_SIZE = 1 << 20  # ranks of a sharded checkpoint
_FOLDER_RE = re.compile(r"ckpt-([0-9]{12})")  # ASCII digits only, whole name: one name per step


def folder_name(step: int) -> str:
    """The folder of the checkpoint at `step`: ckpt-<step, 12 digits>."""
    if step < 0 or step >= 10**12:
        raise ValueError(f"step {step} does not fit the 12-digit folder name")
    return f"ckpt-{step:012d}"


def step_of_folder(name: str) -> int | None:
    """The step a folder name encodes, or None when it is not a checkpoint folder."""
    match = _FOLDER_RE.fullmatch(name)
    return int(match.group(1)) if match else None


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(value: str) -> datetime:
    """An ISO timestamp; one without a zone is taken as UTC (comparisons need aware datetimes)."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class FileEntry:
    path: str
    bytes: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    step: int
    epoch: int
    reason: str
    created: str
    files: tuple[FileEntry, ...]
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    framework: str = ""
    run_id: str = ""
    resumed_from: int | None = None
    format: int = FORMAT_VERSION
    world_size: int | None = None  # the ranks that wrote it (sharded checkpoints only; None: one process)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)

    def to_json(self) -> bytes:
        """Strict JSON (non-finite metrics are left out: they are never 'best', and NaN is not JSON)."""
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["metrics"] = {k: float(v) for k, v in self.metrics.items() if math.isfinite(v)}
        if self.world_size is None:
            del data["world_size"]  # one process: the manifest stays as it always was
        return json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode()


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate manifest bytes; `where` names the checkpoint in error messages.

    The one validator of manifests, for every reader (ls, verify, prune, restore, the worker, the
    daemon, the mirror) and for the writer's own output: whatever it refuses is CorruptCheckpoint
    (damage, kept and named), never another exception. Unknown extra keys are allowed (forward
    compatibility) within the bounds on size and nesting.
    """
    what = f"{where}: manifest.json"
    try:
        data = obj(load_json(raw, what=what, max_bytes=MANIFEST_MAX, max_depth=MANIFEST_DEPTH, nonfinite=True), what)
        version = field(data, "format", integer(1, 2**31), what)
        if version > FORMAT_VERSION:
            raise UnsupportedFormat(
                f"{where}: manifest format {version} is newer than this savegame reads "
                f"({FORMAT_VERSION}); upgrade savegame to read it")
        return _manifest_from_dict(data, what)
    except MalformedInput as exc:
        raise CorruptCheckpoint(str(exc)) from None


_CHECKSUM = re.compile(r"[a-z0-9][a-z0-9-]{0,31}:[A-Za-z0-9+/=_-]{1,256}")
_payload_path = relative_path(max_len=1024, reserved=RESERVED_NAMES)
_text_field = text(256)


def _checksum(value: object) -> str:
    if not isinstance(value, str) or not _CHECKSUM.fullmatch(value):
        raise ValueError("must be 'algorithm:digest', like xxh3-128:<32 hex digits>")
    return value


def _timestamp(value: object) -> str:
    value = text(64)(value)
    try:
        year = parse_time(value).astimezone(timezone.utc).year
    except (ValueError, OverflowError):
        year = 0
    if not 1970 <= year < 9999:  # times outside this range break date arithmetic downstream
        raise ValueError(f"= {value[:40]!r} is not an ISO 8601 time between 1970 and 9998")
    return value


def _file_entry(value: object) -> FileEntry:
    if not isinstance(value, dict):
        raise ValueError(f"has an entry that is {type(value).__name__}, not an object")
    what = f"entry {str(value.get('path'))[:60]!r}"
    try:
        return FileEntry(path=field(value, "path", _payload_path, what),
                         bytes=field(value, "bytes", integer(0, MAX_FILE_BYTES), what),
                         checksum=field(value, "checksum", _checksum, what))
    except MalformedInput as exc:
        raise ValueError(str(exc)) from None


def _files(value: object) -> tuple[FileEntry, ...]:
    files = tuple(items(_file_entry, MAX_FILES)(value))
    seen: set[str] = set()
    for entry in files:
        if entry.path in seen:
            raise ValueError(f"lists {entry.path[:60]!r} twice")
        seen.add(entry.path)
    for entry in files:  # "a" and "a/b" cannot both be files
        parts = entry.path.split("/")
        clash = next(("/".join(parts[:i]) for i in range(1, len(parts)) if "/".join(parts[:i]) in seen), None)
        if clash is not None:
            raise ValueError(f"lists {clash[:60]!r} both as a file and as a folder")
    return files


def _manifest_from_dict(data: dict[str, Any], what: str) -> Manifest:
    return Manifest(
        step=field(data, "step", integer(0, MAX_STEP), what),
        epoch=field(data, "epoch", integer(0, MAX_SAFE_INT), what, default=0),
        reason=field(data, "reason", text(32, REASONS), what, default="periodic"),
        created=field(data, "created", _timestamp, what),
        files=field(data, "files", _files, what),
        metrics=field(data, "metrics", finite_metrics, what, default={}),
        framework=field(data, "framework", text(64), what, default=""),
        run_id=field(data, "run_id", _text_field, what, default=""),
        resumed_from=field(data, "resumed_from", optional(integer(0, MAX_STEP)), what, default=None),
        format=field(data, "format", integer(1, FORMAT_VERSION), what),
        world_size=field(data, "world_size", optional(integer(1, MAX_WORLD_SIZE)), what, default=None),
    )


def check_payload_path(path: str) -> str:
    """The path rule of manifest file entries (relative, no '..', not a reserved name): ValueError if broken."""
    return _payload_path(path)
