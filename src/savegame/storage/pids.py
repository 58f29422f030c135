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
    """Whether a process with this id runs on this host (False for anything that is not a pid)."""
    if not valid_pid(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True
