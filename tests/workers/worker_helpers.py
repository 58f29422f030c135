"""Helpers for the worker-library tests: small training scripts run as real processes, and a real
AF_UNIX datagram socket standing in for the daemon's event socket."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[2]


def worker_env(**extra: str) -> dict[str, str]:
    """The test's environment without daemon variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def default_signals() -> None:
    # A test runner started in the background may ignore SIGINT; the worker must see what a terminal gives it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(script: str, *args: object, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
          preexec: Optional[Callable[[], None]] = None) -> subprocess.Popen:
    """Run a Python script (its text) in a new process; stdout and stderr are pipes of text."""
    def setup() -> None:
        default_signals()
        if preexec is not None:
            preexec()
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env or worker_env(), cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=setup)


def run(script: str, *args: object, env: Optional[dict[str, str]] = None, cwd: Optional[Path] = None,
        timeout: float = 60, preexec: Optional[Callable[[], None]] = None) -> subprocess.CompletedProcess:
    proc = start(script, *args, env=env, cwd=cwd, preexec=preexec)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def read_line(proc: subprocess.Popen, prefix: str, timeout: float = 30) -> str:
    """The first stdout line starting with `prefix` (fails if the process ends first)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"exited ({proc.wait()}) before printing {prefix!r}: {proc.stderr.read()[-2000:]}")
        if line.startswith(prefix):
            return line.rstrip("\n")
    raise AssertionError(f"no {prefix!r} line within {timeout}s")


def stderr_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


class EventSocket:
    """A real AF_UNIX datagram socket where a worker sends its events (as the daemon's would be)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.events: list[dict[str, Any]] = []

    def receive(self, timeout: float) -> Optional[dict[str, Any]]:
        self.sock.settimeout(timeout)
        try:
            event = json.loads(self.sock.recv(1 << 16))
        except socket.timeout:
            return None
        self.events.append(event)
        return event

    def wait_for(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            event = self.receive(left)
            if event is not None and event.get("event") == kind:
                return event
        raise AssertionError(f"no {kind!r} event within {timeout}s; got {[e.get('event') for e in self.events]}")

    def drain(self, quiet_for: float = 0.2) -> list[dict[str, Any]]:
        while self.receive(quiet_for) is not None:
            pass
        return self.events

    def kinds(self) -> list[str]:
        return [e.get("event", "?") for e in self.events]

    def close(self) -> None:
        """Stop listening, as a daemon killed with SIGKILL does (the path stays, nobody reads it)."""
        self.sock.close()
