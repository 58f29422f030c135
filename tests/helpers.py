"""Helpers for tests that run the real `savegame` CLI and real workers as subprocesses."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

TESTS = Path(__file__).resolve().parent
SAVEGAME = str(Path(sys.executable).parent / "savegame")
COUNTER_WORKER = str(TESTS / "workers" / "counter_worker.py")


def clean_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET", "WATCHDOG_"))
           or k == "SAVEGAME_CACHE_DIR"}  # the suite's private cache folder (conftest: private_cache_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout}s")


def savegame(*args: str, env: Optional[dict] = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a savegame command to completion."""
    return subprocess.run([SAVEGAME, *args], capture_output=True, text=True, env=clean_env(env), timeout=timeout)


class Daemon:
    """`savegame run` in the background, with its output in files (no pipe can fill up).

    Every one started is killed, with its worker's processes, when the test ends (pass or fail):
    see the `no_leftover_daemons` fixture in conftest.py."""

    started: list["Daemon"] = []

    def __init__(self, run_dir: Path, worker: Sequence[str], options: Sequence[str] = (),
                 env: Optional[dict] = None, logs: Optional[Path] = None) -> None:
        self.run_dir = Path(run_dir)
        logs = Path(logs) if logs is not None else self.run_dir.parent  # elsewhere when the run's disk breaks
        self.out = logs / f"{self.run_dir.name}.out"
        self.err = logs / f"{self.run_dir.name}.err"
        self.cmd = [SAVEGAME, "run", "--dir", str(self.run_dir), *options, "--", sys.executable, *worker]
        self.env = clean_env(env)
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Daemon":
        with open(self.out, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, env=self.env)
        Daemon.started.append(self)
        return self

    def ready(self, timeout: float = 30) -> int:
        """Wait until the worker announced itself (its signal handlers are in place); its pid."""
        def announced() -> Optional[int]:
            status = self.status() or {}  # this daemon's, not one a previous daemon of the folder left
            mine = self.proc is not None and status.get("daemon_pid") == self.proc.pid
            return status.get("worker_pid") if mine and status.get("worker_ready") else None
        return int(wait_until(announced, timeout))  # type: ignore[arg-type]

    def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signum)

    def status(self) -> Optional[dict]:
        try:
            return json.loads((self.run_dir / ".savegame" / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return None

    def worker_pid(self, timeout: float = 30, other_than: Optional[int] = None) -> int:
        def running_worker() -> Optional[int]:
            status = self.status()
            if status and status.get("state") == "running" and status.get("worker_pid") not in (None, other_than):
                return status["worker_pid"]
            return None
        return int(wait_until(running_worker, timeout))  # type: ignore[arg-type]

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace") if self.err.exists() else ""

    def kill(self) -> None:
        """SIGKILL the daemon, and its worker's process group (a killed daemon cannot do it)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        worker = (self.status() or {}).get("worker_pid")
        if isinstance(worker, int) and worker > 1:
            try:
                os.killpg(worker, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def counter(*args: object) -> list[str]:
    """The counter worker's command line (after the interpreter)."""
    return [COUNTER_WORKER, *map(str, args)]


def committed_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in Path(run_dir).glob("ckpt-*") if (p / "manifest.json").exists())
