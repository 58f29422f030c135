"""Log lines for journald: the sd-daemon(3) convention, used by cli.py when stderr is the journal.

systemd connects a service's stderr to journald and says so in JOURNAL_STREAM ("<device>:<inode>"
of that stream, in decimal). A line that starts with "<N>" gets syslog priority N, and journald
stamps the time itself. Only stderr's own device and inode count: a JOURNAL_STREAM inherited from
an ancestor whose stderr went elsewhere (a terminal, a file) changes nothing.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
DEBUG_PRIORITY = 7


def journal_stream(environ: Mapping[str, str], fd: int) -> bool:
    """Whether descriptor `fd` is the journal stream JOURNAL_STREAM names."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level: error 3, warning 4, info 6, debug 7."""
    return next((priority for level, priority in PRIORITIES if levelno >= level), DEBUG_PRIORITY)


def prefixed(text: str, priority: int) -> str:
    """Every line with the priority prefix (journald reads each line as its own entry)."""
    return "\n".join(f"<{priority}>{line}" for line in text.splitlines() or [""])


class JournalFormatter(logging.Formatter):
    """'<N>LEVEL message' on every line of a record, tracebacks included; no timestamp."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return prefixed(super().format(record), syslog_priority(record.levelno))
