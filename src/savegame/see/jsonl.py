"""Small append-only JSON-lines records in a run folder (`.savegame/history.jsonl`, `attempts.jsonl`).

One JSON object per line, appended with O_APPEND under an exclusive flock (the daemon, `savegame
prune` and a script run on its own may append to one file), never through a symlink. Bounded: an
append that would take the file past its limit first compacts it: the oldest half of its lines is
dropped or folded into one line (`fold`), and the rest rewritten atomically. Reading goes through the
strict parser line by line: a torn last line (a crash mid-append) is left out, and a line that does
not parse is skipped and counted, never a traceback.
"""
from __future__ import annotations

import fcntl
import json
import os
import stat
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from savegame.errors import MalformedInput
from savegame.files import replace_file
from savegame.untrusted import load_json, obj, read_regular_file

MAX_LINE = 16 * 1024
MAX_DEPTH = 6
# fold(dropped, kept) -> the lines that stand for the dropped ones (an "earlier" summary, or none)
Fold = Callable[[list[dict[str, Any]], list[dict[str, Any]]], list[dict[str, Any]]]


@dataclass
class Lines:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0  # lines that did not parse (a torn last line is not counted)


def encode(record: Mapping[str, Any]) -> bytes:
    line = json.dumps(dict(record), separators=(",", ":"), allow_nan=False, default=str).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ValueError(f"a record of {len(line)} bytes is longer than the {MAX_LINE} allowed")
    return line


def parse(raw: bytes, what: str) -> Lines:
    """The records of a JSON-lines file's bytes."""
    lines = Lines()
    *complete, _torn = raw.split(b"\n")  # what follows the last newline was cut short: left out
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            lines.records.append(obj(load_json(line, what=f"{what} line {number}", max_bytes=MAX_LINE,
                                               max_depth=MAX_DEPTH), f"{what} line {number}"))
        except MalformedInput:
            lines.skipped += 1
    return lines


def read(path: str, max_bytes: int) -> Lines:
    """The records of a local file; empty when it does not exist. MalformedInput when it is not a
    regular file or far larger than savegame lets it grow; OSError when it cannot be read."""
    try:
        raw = read_regular_file(path, 2 * max_bytes)
    except FileNotFoundError:
        return Lines()
    return parse(raw, path)


def append(path: str, record: Mapping[str, Any], max_bytes: int, fold: Optional[Fold] = None) -> None:
    """Append one record; compact first when the file would grow past `max_bytes`. OSError as usual."""
    line = encode(record)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for _ in range(4):  # a file compacted or replaced meanwhile is opened again
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MalformedInput(f"{path}: not a regular file")
            if not _same_file(path, info):
                continue
            if info.st_size + len(line) > max_bytes:
                _compact(path, max_bytes, fold)
                continue
            os.write(fd, line)
            return
        finally:
            os.close(fd)  # and with it the lock
    raise OSError(f"{path}: kept changing while a record was appended")


def _same_file(path: str, info: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


def _compact(path: str, max_bytes: int, fold: Optional[Fold]) -> None:
    """Keep the newest lines (at most half the limit), the dropped ones folded; atomic rename.
    Called under the file's lock: appenders waiting on it find a new file and open that."""
    records = read(path, max_bytes).records
    encoded = [encode(r) for r in records]
    kept_bytes, cut = 0, len(encoded)
    while cut > 0 and kept_bytes + len(encoded[cut - 1]) <= max_bytes // 2:
        cut -= 1
        kept_bytes += len(encoded[cut])
    dropped, kept = records[:cut], records[cut:]
    head = fold(dropped, kept) if fold and dropped else []
    write_atomically(path, b"".join([*(encode(r) for r in head), *encoded[cut:]]))


def write_atomically(path: str, data: bytes) -> None:
    """Replace a file by a new one."""
    replace_file(path, data, durable=True)
