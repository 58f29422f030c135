"""Process ids read from outside (staging folder names, status files): bounded before use.

os.kill(pid, 0) with pid 0 or -1 asks about a process group or every process, and a pid beyond the
kernel's range raises OverflowError: only 0 < pid <= pid_max is a process id at all.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from typing import Optional

PID_MAX_DEFAULT = 4_194_304  # Linux's upper limit (PID_MAX_LIMIT on 64-bit)
_DIGITS = re.compile(r"[0-9]{1,10}")


@lru_cache(maxsize=1)
def pid_max() -> int:
    """The kernel's largest process id."""
    try:
        with open("/proc/sys/kernel/pid_max", "rb") as f:
            value = int(f.read(32).strip())
    except (OSError, ValueError):
        return PID_MAX_DEFAULT
    return value if 0 < value <= PID_MAX_DEFAULT else PID_MAX_DEFAULT


def parse_pid(text: str) -> Optional[int]:
    """The pid a string names, or None when it is not one (not ASCII digits, 0, or beyond pid_max)."""
    if not _DIGITS.fullmatch(text):
        return None
    pid = int(text)
    return pid if 0 < pid <= pid_max() else None


def valid_pid(pid: object) -> bool:
    return isinstance(pid, int) and not isinstance(pid, bool) and 0 < pid <= pid_max()


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (False for anything that is not a pid, and
    for a zombie: a process killed but not yet reaped by its parent is gone for every purpose here)."""
    if not valid_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read(4096)
    except OSError:
        return False  # no /proc (not Linux): kill(0) is all we know
    fields = stat[stat.rfind(b")") + 2:].split()
    return bool(fields) and fields[0] in (b"Z", b"X")
