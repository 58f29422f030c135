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
import re
import stat
from typing import Any, BinaryIO, Callable, Mapping, Optional, Sequence

from savegame.errors import MalformedInput

MAX_DEPTH = 16
MAX_SAFE_INT = 2**53  # beyond this a JSON number is not an exact integer in most readers
_MISSING = object()


def load_json(raw: bytes | str, *, what: str, max_bytes: int, max_depth: int = MAX_DEPTH,
              nonfinite: bool = False) -> Any:
    """Parse bounded JSON: at most `max_bytes`, nested at most `max_depth` deep, finite numbers only.

    `nonfinite=True` reads NaN, Infinity and overflowing numbers as float nan/inf instead of failing,
    for files older writers may have written them into (manifest metrics): the field checks then
    refuse them wherever a finite number is needed, and `finite_metrics` drops them.
    """
    if len(raw) > max_bytes:
        raise MalformedInput(f"{what}: {len(raw)} bytes, more than the {max_bytes} allowed")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedInput(f"{what}: not UTF-8 text") from None
    _check_depth(raw, max_depth, what)
    hooks: dict[str, Any] = {} if nonfinite else {"parse_constant": _no_constant, "parse_float": _finite_float}
    try:
        return json.loads(raw, **hooks)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, too many digits, NaN, Infinity
        raise MalformedInput(f"{what}: not valid JSON ({_short(exc)})") from None


# A whole string (an unterminated one runs to the end: no rescans, linear time), or one bracket.
_TOKENS = re.compile(r'"(?:[^"\\]|\\.|\\\Z)*(?:"|\Z)|[\[\]{}]', re.DOTALL)


def _check_depth(text: str, max_depth: int, what: str) -> None:
    """Reject deep nesting before the parser recurses into it (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= max_depth:
        return
    depth = 0
    for token in _TOKENS.finditer(text):  # strings are skipped whole, in C: fast on large manifests
        char = token.group()
        if char in "[{":
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
    """Metric name -> value. Non-finite values (NaN, +-inf) are left out: they are never 'best'.
    A value that is not a number at all is an error."""
    if not isinstance(value, dict):
        raise ValueError("must be an object of metric name -> number")
    if len(value) > max_items:
        raise ValueError(f"has more than {max_items} metrics")
    out = {}
    for name, metric in value.items():
        if not name or len(name) > 256:
            raise ValueError("has a metric name that is empty or longer than 256 characters")
        if isinstance(metric, bool) or not isinstance(metric, (int, float)):
            raise ValueError(f"{name[:40]!r} must be a number, not {type(metric).__name__}")
        if math.isfinite(metric):
            out[name] = float(metric)
    return out


def items(check: Check, max_items: int) -> Check:
    """A JSON array of at most `max_items`, each passing `check`."""
    def check_list(value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise ValueError(f"must be an array, not {type(value).__name__}")
        if len(value) > max_items:
            raise ValueError(f"has {len(value)} entries, more than the {max_items} allowed")
        return [check(item) for item in value]
    return check_list


def optional(check: Check) -> Check:
    """`check`, or None."""
    return lambda value: None if value is None else check(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


def relative_path(max_len: int = 1024, reserved: Sequence[str] = ()) -> Check:
    """A path inside a folder, written with '/': relative, no empty, '.' or '..' component, no
    backslash, NUL or control character, and not one of the `reserved` names at the top level
    (compared without case, for case-insensitive filesystems)."""
    taken = {name.lower() for name in reserved}

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"must be a string, not {type(value).__name__}")
        if not value or len(value) > max_len:
            raise ValueError(f"must be 1 to {max_len} characters long")
        if _CONTROL.search(value):
            raise ValueError(f"{value[:60]!r} holds a backslash, NUL or control character")
        parts = value.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"{value[:60]!r} is not a plain relative path (empty, '.' or '..' part, or a leading '/')")
        if any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in parts):
            raise ValueError(f"{value[:60]!r} has a component longer than 255 bytes")
        if len(parts) == 1 and value.lower() in taken:
            raise ValueError(f"{value!r} is a name savegame reserves for itself")
        return value
    return check


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


def open_regular_file(root: str, relpath: str) -> BinaryIO:
    """`root`/`relpath` opened for reading, following no symlink below `root` (each folder on the way
    is opened with O_NOFOLLOW), and only if it is a regular file: a FIFO would block, a device like
    /dev/zero would never end. MalformedInput when it is a link or not a regular file."""
    parts = relpath.split("/")
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            next_fd = _open_nofollow(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd, relpath)
            os.close(dir_fd)
            dir_fd = next_fd
        fd = _open_nofollow(parts[-1], os.O_RDONLY | os.O_NONBLOCK, dir_fd, relpath)
    finally:
        os.close(dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise MalformedInput(f"{relpath}: not a regular file (a FIFO, a device or a folder); not read")
    return os.fdopen(fd, "rb", buffering=0)


def _open_nofollow(name: str, flags: int, dir_fd: int, relpath: str) -> int:
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        if is_symlink_error(exc) or (exc.errno == errno.ENOTDIR and _is_link(name, dir_fd)):
            raise MalformedInput(f"{relpath}: {name!r} is a symbolic link, which savegame never follows") from None
        raise


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return False
