"""What the store hands out: committed checkpoints, problems found in a scan; and the one place
backend errors become savegame's."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator, Mapping

from savegame.errors import SavegameError
from savegame.storage.backends import storage_error
from savegame.storage.manifest import Manifest


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
def mapped_errors(what: str) -> Iterator[None]:
    """Map any backend error to StorageError at the boundary."""
    try:
        yield
    except SavegameError:
        raise
    except Exception as exc:  # noqa: BLE001 - the boundary: botocore, aiohttp, OSError, ...
        raise storage_error(exc, what) from exc
