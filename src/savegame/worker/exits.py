"""How a worker ends when it cannot go on: one line on stderr naming the problem, and an exit code
the daemon understands (78: never retried; 74: a checkpoint did not reach the disk)."""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn, Optional

from savegame import protocol
from savegame.errors import ConfigError


# Told the exit code and line before the process exits: the Checkpointer reports them to the daemon,
# which would otherwise see only a launcher's own code (torchrun exits 1 whatever its ranks meant).
on_exit: Optional[Callable[[int, str], None]] = None


def _report(code: int, line: str) -> None:
    if on_exit is not None:
        try:
            on_exit(code, line)
        except Exception:  # noqa: BLE001 - reporting must never hide the exit itself
            pass


def say(line: str) -> None:
    """One line for the person at the terminal (or the daemon's log); never fails (a full disk, a
    terminal that is gone must not turn a clean exit into a crash)."""
    try:
        print(f"savegame: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


class TolerantStream:
    """sys.stdout / sys.stderr for a supervised worker: writes that fail because the output cannot
    take them (a full disk, EIO, a closed pipe) are dropped instead of killing the training. The
    output is the daemon's business (it forwards and keeps it); training must go on without it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            self.dropped += len(text)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def protect_output() -> None:
    """Wrap sys.stdout and sys.stderr in TolerantStream (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, TolerantStream):
            setattr(sys, name, TolerantStream(stream))


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
    _report(protocol.EXIT_CONFIG, f"configuration error: {exc}")
    raise SystemExit(protocol.EXIT_CONFIG)


def exit_io(line: str) -> NoReturn:
    """A checkpoint that must exist was not committed (a full disk, an I/O error): exit 74."""
    say(line)
    _report(protocol.EXIT_IO, line)
    raise SystemExit(protocol.EXIT_IO)
