"""The run's record of anomalous losses (NaN, spikes): what was rolled back, and which batches to skip.

`.savegame/anomalies.json` in the run folder, appended by the worker that saw the loss go bad
(under a daemon and on its own):

    {"format": 1, "anomalies": [{"step": 30, "epoch": 0, "batch": 30, "kind": "nan", "loss": null,
                                 "skip": true, "time": 1790000000.0}]}

`step` is the state the bad loss was measured on: checkpoints at or after it are set aside. `epoch`
and `batch` are the data position of the batch that produced it: with `skip: true` every later start
steps over that batch, whichever checkpoint it resumes from. The daemon reads how many there were
(`rollback.max`) and the last one's step. It lives beside the checkpoints on this machine (a fresh VM
that resumes from the bucket starts without it: a bad batch met again is rolled back again).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from savegame.errors import MalformedInput
from savegame.files import replace_file
from savegame.untrusted import load_json, read_regular_file

RECORD_PATH = os.path.join(".savegame", "anomalies.json")
MAX_RECORD_BYTES = 1 << 20
MAX_ENTRIES = 1000


@dataclass(frozen=True)
class AnomalyEntry:
    step: int
    epoch: int
    batch: int
    kind: str
    loss: Optional[float]  # None: not finite (JSON has no NaN)
    skip: bool
    time: float


def read_anomalies(run_dir: str) -> list[AnomalyEntry]:
    """The record's entries, oldest first; none when there is no record. MalformedInput when damaged."""
    try:
        raw = read_regular_file(os.path.join(run_dir, RECORD_PATH), MAX_RECORD_BYTES)
    except FileNotFoundError:
        return []
    data = load_json(raw, what=RECORD_PATH, max_bytes=MAX_RECORD_BYTES, max_depth=4)
    entries = data.get("anomalies") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise MalformedInput(f"{RECORD_PATH}: no list of anomalies")
    return [_entry(e) for e in entries[-MAX_ENTRIES:]]


def add_anomaly(run_dir: str, entry: AnomalyEntry) -> int:
    """Append an entry (atomically: a new file replaces the old); the number of entries now. OSError."""
    try:
        entries = read_anomalies(run_dir)
    except MalformedInput:
        entries = []  # a damaged record: start it again rather than lose this entry
    entries.append(entry)
    record = {"format": 1, "anomalies": [asdict(e) for e in entries[-MAX_ENTRIES:]]}
    path = os.path.join(run_dir, RECORD_PATH)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, json.dumps(record, indent=1).encode(), durable=True)
    return len(entries)


def skipped_batches(entries: list[AnomalyEntry]) -> frozenset[tuple[int, int]]:
    """The (epoch, batch) positions every start steps over."""
    return frozenset((e.epoch, e.batch) for e in entries if e.skip)


def _entry(value: Any) -> AnomalyEntry:
    def whole(key: str) -> int:
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MalformedInput(f"{RECORD_PATH}: {key} must be an integer >= 0")
        return v

    if not isinstance(value, dict):
        raise MalformedInput(f"{RECORD_PATH}: an entry is not an object")
    loss, when = value.get("loss"), value.get("time", 0.0)
    if loss is not None and (isinstance(loss, bool) or not isinstance(loss, (int, float))):
        raise MalformedInput(f"{RECORD_PATH}: loss must be a number or null")
    if isinstance(when, bool) or not isinstance(when, (int, float)):
        raise MalformedInput(f"{RECORD_PATH}: time must be a number")
    return AnomalyEntry(whole("step"), whole("epoch"), whole("batch"), str(value.get("kind", "?"))[:16],
                        None if loss is None else float(loss), value.get("skip") is True, float(when))


def finite_or_none(loss: float) -> Optional[float]:
    return loss if math.isfinite(loss) else None
