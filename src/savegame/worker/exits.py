"""How a worker ends when it cannot go on: one line on stderr naming the problem, and an exit code
the daemon understands (78: never retried; 74: a checkpoint did not reach the disk)."""
from __future__ import annotations

import os
import sys
from typing import NoReturn

from savegame import protocol
from savegame.errors import ConfigError


def say(line: str) -> None:
    """One line for the person at the terminal (or the daemon's log)."""
    print(f"savegame: {line}", file=sys.stderr, flush=True)


_warned: set[str] = set()


def warn_once(key: str, line: str) -> None:
    """A warning said once per process (e.g. about the data loader, at each resume it would repeat)."""
    if key not in _warned:
        _warned.add(key)
        say(f"warning: {line}")


def say_now(line: str) -> None:
    """`say` from a signal handler: one write(2), nothing buffered that the interrupted code may hold."""
    try:
        os.write(2, f"savegame: {line}\n".encode())
    except OSError:
        pass


def exit_config(exc: ConfigError) -> NoReturn:
    """A mistake in the script or its settings: say so and exit 78 (the daemon does not retry it)."""
    say(f"configuration error: {exc}")
    raise SystemExit(protocol.EXIT_CONFIG)


def exit_io(line: str) -> NoReturn:
    """A checkpoint that must exist was not committed (a full disk, an I/O error): exit 74."""
    say(line)
    raise SystemExit(protocol.EXIT_IO)
