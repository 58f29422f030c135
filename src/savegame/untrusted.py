"""The one place that parses what comes from outside: JSON from storage, datagrams, status files.

Everything savegame reads that another process, another user or a bucket could have written goes
through here first: bounded in size and nesting, no NaN or infinities, no huge numbers, and read
only from regular files (never through a symlink, never from a FIFO or a device). What fails is a
`MalformedInput` (a ValueError) naming what was wrong; callers turn it into "damaged", "dropped"
or a one-line error, never a traceback.

    data = load_json(raw, what="manifest.json of ckpt-000000000100", max_bytes=MANIFEST_MAX)
    step = field(data, "step", integer(0, MAX_STEP), what)
"""
from __future__ import annotations

import errno
import json
import math
import os
import stat
from typing import Any, Callable, Mapping, Optional

from savegame.errors import MalformedInput

MAX_DEPTH = 16
MAX_SAFE_INT = 2**53  # beyond this a JSON number is not an exact integer in most readers
_MISSING = object()


def load_json(raw: bytes | str, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH) -> Any:
    """Parse bounded JSON: at most `max_bytes`, nested at most `max_depth` deep, finite numbers only."""
    if len(raw) > max_bytes:
        raise MalformedInput(f"{what}: {len(raw)} bytes, more than the {max_bytes} allowed")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedInput(f"{what}: not UTF-8 text") from None
    _check_depth(raw, max_depth, what)
    try:
        return json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, NaN, Infinity
        raise MalformedInput(f"{what}: not valid JSON ({_short(exc)})") from None


def _check_depth(text: str, max_depth: int, what: str) -> None:
    """Reject deep nesting before the parser recurses into it (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth, in_string, escaped = 0, False, False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > max_depth:
                raise MalformedInput(f"{what}: nested more than {max_depth} levels deep")
        elif char in "]}":
            depth -= 1


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# -- fields ----------------------------------------------------------------------------------------

Check = Callable[[Any], Any]


def field(data: Mapping[str, Any], key: str, check: Check, what: str, default: Any = _MISSING) -> Any:
    """`data[key]` after `check`; `default` when it is missing (or required when no default is given)."""
    if key not in data or data[key] is None and default is not _MISSING:
        if default is _MISSING:
            raise MalformedInput(f"{what}: {key!r} is missing")
        return default
    try:
        return check(data[key])
    except MalformedInput:
        raise
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"{what}: {key!r} {exc}") from None


def obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedInput(f"{what}: must be a JSON object, not {type(value).__name__}")
    return value


def integer(minimum: int = 0, maximum: int = MAX_SAFE_INT) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, not {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise ValueError(f"= {value} is out of range [{minimum}, {maximum}]")
        return value
    return check


def text(max_len: int = 256, allowed: Optional[tuple[str, ...]] = None) -> Check:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {type(value).__name__}")
        if len(value) > max_len:
            raise ValueError(f"is longer than {max_len} characters")
        if allowed is not None and value not in allowed:
            raise ValueError(f"= {value[:40]!r} is not one of {', '.join(allowed)}")
        return value
    return check


def number(value: Any) -> float:
    """A finite number (an int is taken as a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {type(value).__name__}")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError("must be finite")
    return as_float


def finite_metrics(value: Any, max_items: int = 1024) -> dict[str, float]:
    """Metric name -> value. Non-finite or non-numeric values are left out: they are never 'best'."""
    if not isinstance(value, dict):
        raise ValueError("must be an object of metric name -> number")
    if len(value) > max_items:
        raise ValueError(f"has more than {max_items} metrics")
    out = {}
    for name, metric in value.items():
        if len(name) > 256:
            raise ValueError("has a metric name longer than 256 characters")
        if isinstance(metric, (int, float)) and not isinstance(metric, bool) and math.isfinite(metric):
            out[name] = float(metric)
    return out


# -- files -----------------------------------------------------------------------------------------

def read_regular_file(path: str, max_bytes: int, *, dir_fd: Optional[int] = None,
                      follow_symlinks: bool = False) -> bytes:
    """The bytes of a regular file, never blocking on a FIFO, refusing devices and anything larger
    than `max_bytes`, and (unless `follow_symlinks`: a user's own config file may be a link) never
    through a symlink at the last component. OSError as usual when it is missing or unreadable;
    MalformedInput when it is not a regular file or too large."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MalformedInput(f"{path}: not a regular file")
        if info.st_size > max_bytes:
            raise MalformedInput(f"{path}: {info.st_size} bytes, more than the {max_bytes} allowed")
        chunks, left = [], max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise MalformedInput(f"{path}: grew past the {max_bytes} bytes allowed while being read")
        return data
    finally:
        os.close(fd)


def is_symlink_error(exc: OSError) -> bool:
    """O_NOFOLLOW on a symlink fails with ELOOP (Linux) or EMLINK (some BSDs)."""
    return exc.errno in (errno.ELOOP, errno.EMLINK)
