"""Every checkpoint a run ever committed: the record `.savegame/history.jsonl` and its rows.

Whoever commits or deletes a checkpoint appends a line (the daemon for its worker and its two
retention tiers, `savegame prune`, a script run on its own), so a pruned checkpoint still shows:

    {"kind": "commit", "time": t, "step": 200, "epoch": 2, "reason": "best", "metrics": {...},
     "bytes": 123, "persist_s": 0.4, "attempt": 3, "by": "daemon"}
    {"kind": "prune", "time": t, "step": 100, "tier": "local", "by": "daemon", "why": "not kept by ..."}
    {"kind": "failed", "time": t, "step": 105, "reason": "periodic", "error": "...", "attempt": 3}

The mirror copies the file into the bucket (`.savegame/history.jsonl` there too) whenever the bucket
changes. Rows join the record with what the store holds now: the manifest is the truth for what is
kept, the record says what was pruned and why. Recording never fails the caller (a full disk costs
a history line, not a checkpoint): it logs a warning once.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from savegame.errors import MalformedInput, SavegameError, StorageError
from savegame.see import jsonl
from savegame.untrusted import field, finite_metrics, integer, number, optional, read_regular_file, text

log = logging.getLogger("savegame")
HISTORY_PATH = ".savegame/history.jsonl"
MAX_HISTORY_BYTES = 8 << 20  # some 25,000 checkpoints; past it the oldest half of the lines goes
REASONS = ("periodic", "best", "emergency", "final", "manual")
TIERS = ("local", "mirror")
MAX_STEP = 10**12 - 1
_warned: set[str] = set()


def history_file(run_dir: str) -> str:
    return os.path.join(run_dir, HISTORY_PATH)


def record(run_dir: str, entry: Mapping[str, Any]) -> bool:
    """Append one line to a local run folder's history; False (and one warning) when it cannot.
    A folder without .savegame/ (checkpoints copied by hand, say) is not a run folder: no record."""
    path = history_file(run_dir)
    if not os.path.isdir(os.path.dirname(path)):
        return False
    try:
        jsonl.append(path, {**entry, "time": round(time.time(), 3)}, MAX_HISTORY_BYTES)
    except (OSError, MalformedInput, ValueError) as exc:
        if path not in _warned:
            _warned.add(path)
            log.warning("cannot record the run's history in %s: %s", path, exc)
        return False
    return True


def record_commit(store: Any, info: Any, persist_s: Optional[float], attempt: Optional[int] = None) -> None:
    """A script run on its own committed a checkpoint (a local run folder only)."""
    if store.is_local:
        record(store.location.path, commit_entry(info.step, info.epoch, info.reason, dict(info.metrics), info.bytes,
                                                 attempt, "worker", persist_s))


def record_prune(store: Any, step: int, by: str, why: str) -> None:
    """A checkpoint was deleted by `savegame prune` or a script's own retention."""
    if store.is_local:
        record(store.location.path, prune_entry(step, "local", by, why))


def commit_entry(step: int, epoch: Optional[int], reason: Any, metrics: Any, size: Any,
                 attempt: Optional[int], by: str, persist_s: Optional[float] = None) -> dict[str, Any]:
    return {"kind": "commit", "step": step, "epoch": epoch, "reason": reason if reason in REASONS else None,
            "metrics": _finite(metrics), "bytes": size if isinstance(size, int) and size >= 0 else None,
            "persist_s": persist_s, "attempt": attempt, "by": by}


def prune_entry(step: int, tier: str, by: str, why: str) -> dict[str, Any]:
    return {"kind": "prune", "step": step, "tier": tier, "by": by, "why": why[:500]}


def failed_entry(step: int, reason: Any, error: Any, attempt: Optional[int]) -> dict[str, Any]:
    return {"kind": "failed", "step": step, "reason": reason if reason in REASONS else None,
            "error": str(error)[:500], "attempt": attempt}


def _finite(metrics: Any) -> dict[str, float]:
    try:
        return {k[:256]: v for k, v in finite_metrics(metrics).items()}
    except ValueError:
        return {}


def prune_why(config: Any, tier: str) -> str:
    """Why retention deleted a checkpoint, in words: the policy it was not kept by."""
    keep = config.values["keep" if tier == "local" else "mirror_keep"]
    parts = [f"last {keep['last']}"]
    if keep.get("best") and config.monitor:
        parts.append(f"best {keep['best']} by {config.monitor[0]}")
    if keep.get("every"):
        parts.append(f"every {keep['every']} {keep.get('every_unit', 'step')}s")
    if keep.get("thin"):
        parts.append(f"{len(keep['thin'])} thinning tiers")
    return f"not kept by the {config.regime} policy ({', '.join(parts)})"


# -- reading -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Commit:
    time: float
    step: int
    epoch: Optional[int]
    reason: Optional[str]
    metrics: Mapping[str, float]
    bytes: Optional[int]
    persist_s: Optional[float]
    attempt: Optional[int]


@dataclass(frozen=True)
class Prune:
    time: float
    step: int
    tier: str
    by: str
    why: str


@dataclass(frozen=True)
class Failed:
    time: float
    step: int
    reason: Optional[str]
    error: str
    attempt: Optional[int]


@dataclass
class History:
    commits: list[Commit]
    prunes: list[Prune]
    failed: list[Failed]
    skipped: int = 0  # lines that were not history records savegame writes


def parse_history(lines: jsonl.Lines, what: str) -> History:
    """The records of a history file, each field checked; a record that does not check is skipped."""
    history = History([], [], [], lines.skipped)
    parsers = {"commit": (_commit, history.commits), "prune": (_prune, history.prunes),
               "failed": (_failed, history.failed)}
    for record in lines.records:
        kind = parsers.get(record.get("kind"))  # type: ignore[arg-type]
        try:
            if kind is None:
                raise MalformedInput(f"{what}: unknown kind")
            kind[1].append(kind[0](record, what))
        except MalformedInput:
            history.skipped += 1
    return history


def _time(r: Mapping[str, Any], what: str) -> float:
    return field(r, "time", number, what)


def _step(r: Mapping[str, Any], what: str) -> int:
    return field(r, "step", integer(0, MAX_STEP), what)


def _commit(r: Mapping[str, Any], what: str) -> Commit:
    return Commit(_time(r, what), _step(r, what), field(r, "epoch", optional(integer()), what, None),
                  field(r, "reason", optional(text(16, REASONS)), what, None),
                  field(r, "metrics", finite_metrics, what, {}), field(r, "bytes", optional(integer()), what, None),
                  field(r, "persist_s", optional(number), what, None),
                  field(r, "attempt", optional(integer(1)), what, None))


def _prune(r: Mapping[str, Any], what: str) -> Prune:
    return Prune(_time(r, what), _step(r, what), field(r, "tier", text(16, TIERS), what),
                 field(r, "by", text(32), what, "?"), field(r, "why", text(500), what, ""))


def _failed(r: Mapping[str, Any], what: str) -> Failed:
    return Failed(_time(r, what), _step(r, what), field(r, "reason", optional(text(16, REASONS)), what, None),
                  field(r, "error", text(500), what, ""), field(r, "attempt", optional(integer(1)), what, None))


def read_history(store: Any) -> History:
    """The history stored with a run root: the run folder's file, or the copy the mirror keeps in the
    bucket. Empty when there is none; StorageError when it cannot be read."""
    where = f"{store.url}/{HISTORY_PATH}"
    try:
        raw = _read_raw(store)
    except FileNotFoundError:
        return History([], [], [])
    except MalformedInput as exc:
        raise StorageError(f"{where} is not a history savegame wrote: {exc}") from None
    except OSError as exc:
        raise StorageError(f"cannot read {where}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_history(jsonl.parse(raw, where), where)


def _read_raw(store: Any) -> bytes:
    limit = 2 * MAX_HISTORY_BYTES
    if store.is_local:
        return read_regular_file(history_file(store.location.path), limit)
    backend = store._backend  # noqa: SLF001 - one small object beside the checkpoints, like the policy
    path = backend.full(HISTORY_PATH)
    try:
        size = backend.fs.size(path)
        if size is not None and size > limit:
            raise MalformedInput(f"{size} bytes, more than the {limit} allowed")
        return backend.fs.cat_file(path)
    except (FileNotFoundError, MalformedInput):
        raise
    except Exception as exc:  # noqa: BLE001 - the storage boundary: botocore, aiohttp
        raise StorageError(f"{store.url}: cannot read the run's history: {exc}") from None


def upload_history(run_dir: str, remote: Any) -> None:
    """Copy the run folder's history into the bucket (the mirror calls it when the bucket changed)."""
    try:
        data = read_regular_file(history_file(run_dir), 2 * MAX_HISTORY_BYTES)
    except FileNotFoundError:
        return
    except (OSError, MalformedInput, SavegameError) as exc:
        log.warning("not copying the run's history to the mirror: %s", exc)
        return
    try:
        if remote.is_local:  # a mirror on another disk
            os.makedirs(os.path.dirname(history_file(remote.location.path)), exist_ok=True)
            jsonl.write_atomically(history_file(remote.location.path), data)
        else:
            backend = remote._backend  # noqa: SLF001
            backend.fs.pipe_file(backend.full(HISTORY_PATH), data)
    except Exception as exc:  # noqa: BLE001 - the storage boundary
        raise StorageError(f"{remote.url}: cannot store the run's history: {exc}") from None


def iso(seconds: Optional[float]) -> Optional[str]:
    if seconds is None:
        return None
    # to the millisecond, as the manifests' times: `plot` places commits on a timeline by it
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
