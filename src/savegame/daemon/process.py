"""The worker process: started in its own process group with the contract environment."""
from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
from typing import Mapping, Optional, Sequence

from savegame import protocol
from savegame.errors import ConfigError

log = logging.getLogger("savegame")
# systemd's variables are the daemon's own: a worker that spoke sd_notify would confuse systemd.
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")


def worker_env(base: Mapping[str, str], run_dir: str, resume_from: Optional[str], run_id: str, attempt: int,
               events: str, settings_path: str, progress_path: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in PRIVATE_ENV}
    env.update({protocol.ENV_DIR: run_dir, protocol.ENV_RESUME_FROM: resume_from or "",
                protocol.ENV_RUN_ID: run_id, protocol.ENV_ATTEMPT: str(attempt), protocol.ENV_EVENTS: events,
                protocol.ENV_CONFIG: settings_path, protocol.ENV_PROGRESS: progress_path})
    return env


class WorkerProcess:
    """One running worker. The daemon signals its main process, or kills its whole group."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str]) -> None:
        try:
            self._popen = subprocess.Popen(list(command), env=dict(env), stdin=subprocess.DEVNULL,
                                           process_group=0, close_fds=True)
        except FileNotFoundError:
            raise ConfigError(f"command not found: {command[0]!r}; check the command after --") from None
        except PermissionError:
            raise ConfigError(f"command not executable: {command[0]!r}") from None
        except OSError as exc:  # e.g. a script without a #! line (ENOEXEC)
            raise ConfigError(f"cannot run {command[0]!r}: {exc.strerror}; run it through its "
                              "interpreter (python train.py) or give it a #! line") from None
        self.pid = self._popen.pid
        self.pgid = self.pid  # process_group=0 makes the worker its group's leader
        self._owned: dict[int, bool] = {}

    def owns(self, pid: int) -> bool:
        """Whether `pid` is one of this worker's processes: in its process group, or a descendant
        (torchrun starts its ranks in sessions of their own)."""
        if pid == self.pid:
            return True
        known = self._owned.get(pid)
        if known is None:
            known = self._owned[pid] = _in_group(pid, self.pgid) or _descends_from(pid, self.pid)
        return known

    def poll(self) -> Optional[tuple[Optional[int], Optional[int]]]:
        """(exit code, None) or (None, signal) once it has exited; None while it runs."""
        code = self._popen.poll()
        if code is None:
            return None
        return (code, None) if code >= 0 else (None, -code)

    def send(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def kill_group(self) -> None:
        """SIGKILL everything in the worker's group (its DataLoader children too)."""
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                log.warning("cannot kill process group %d: %s", self.pgid, exc)


def _in_group(pid: int, pgid: int) -> bool:
    try:
        return os.getpgid(pid) == pgid
    except OSError:
        return False


def parent_of(pid: int) -> Optional[int]:
    """The parent pid from /proc (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]) if len(fields) > 1 else None


def _descends_from(pid: int, ancestor: int, max_depth: int = 64) -> bool:
    for _ in range(max_depth):
        parent = parent_of(pid)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        pid = parent
    return False
