"""The manifest: the one file whose presence makes a folder a committed checkpoint."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from savegame.errors import CorruptCheckpoint, UnsupportedFormat

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
REASONS = ("periodic", "best", "emergency", "final", "manual")
_FOLDER_RE = re.compile(r"^ckpt-(\d{12})$")


def folder_name(step: int) -> str:
    """The folder of the checkpoint at `step`: ckpt-<step, 12 digits>."""
    if step < 0 or step >= 10**12:
        raise ValueError(f"step {step} does not fit the 12-digit folder name")
    return f"ckpt-{step:012d}"


def step_of_folder(name: str) -> int | None:
    """The step a folder name encodes, or None when it is not a checkpoint folder."""
    match = _FOLDER_RE.match(name)
    return int(match.group(1)) if match else None


def utc_now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    """An ISO timestamp; one without a zone is taken as UTC (comparisons need aware datetimes)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
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
    metrics: Mapping[str, float] = field(default_factory=dict)
    framework: str = ""
    run_id: str = ""
    resumed_from: int | None = None
    format: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def created_at(self) -> datetime:
        return parse_time(self.created)

    def to_json(self) -> bytes:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        data["metrics"] = dict(self.metrics)
        return json.dumps(data, indent=1, sort_keys=True).encode()


def parse_manifest(raw: bytes, where: str) -> Manifest:
    """Parse and validate manifest bytes; `where` names the checkpoint in error messages."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"{where}: manifest.json is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{where}: manifest.json is not a JSON object")
    version = data.get("format")
    if not isinstance(version, int):
        raise CorruptCheckpoint(f"{where}: manifest.json has no integer 'format'")
    if version > FORMAT_VERSION:
        raise UnsupportedFormat(
            f"{where}: manifest format {version} is newer than this savegame reads "
            f"({FORMAT_VERSION}); upgrade savegame to read it"
        )
    try:
        return _manifest_from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpoint(f"{where}: manifest.json is malformed ({exc!r})") from None


def _manifest_from_dict(data: dict[str, Any]) -> Manifest:
    files = tuple(
        FileEntry(path=str(f["path"]), bytes=int(f["bytes"]), checksum=str(f["checksum"]))
        for f in data["files"]
    )
    for entry in files:
        if entry.path.startswith(("/", "..")) or "/../" in entry.path or entry.bytes < 0:
            raise ValueError(f"bad file entry {entry.path!r}")
    metrics = {str(k): float(v) for k, v in dict(data.get("metrics") or {}).items()}
    if any(math.isnan(v) for v in metrics.values()):
        metrics = {k: v for k, v in metrics.items() if not math.isnan(v)}
    resumed = data.get("resumed_from")
    parse_time(str(data["created"]))  # raises ValueError when it is not a timestamp
    return Manifest(
        step=int(data["step"]),
        epoch=int(data.get("epoch", 0)),
        reason=str(data.get("reason", "periodic")),
        created=str(data["created"]),
        files=files,
        metrics=metrics,
        framework=str(data.get("framework", "")),
        run_id=str(data.get("run_id", "")),
        resumed_from=None if resumed is None else int(resumed),
        format=int(data["format"]),
    )
