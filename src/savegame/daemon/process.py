"""The worker process: started in its own process group with the contract environment.

It inherits the run folder's lock (so the folder stays locked while any of its processes lives,
even when the daemon is killed) and writes its output into files the daemon owns (so a dropped
terminal or a dead daemon never breaks its `print`). The daemon signals the processes that
announced themselves, and kills the whole tree: the group, and descendants in other sessions
(torchrun starts its ranks in sessions of their own).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
from typing import Iterable, Mapping, Optional, Sequence

from savegame import protocol
from savegame.errors import ConfigError

log = logging.getLogger("savegame")
# systemd's variables are the daemon's own: a worker that spoke sd_notify would confuse systemd.
# The daemon's own, never passed through: systemd's, and the shared-memory folder (only the daemon
# that made it may offer it: a worker handing saves to a folder nobody reads would wait forever).
PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", protocol.ENV_SEGMENTS,
               protocol.ENV_RESTORE_SEGMENT)
ENV_DAEMON_PID = "SAVEGAME_DAEMON_PID"  # so a worker can tell whether its parent is the daemon


def worker_env(base: Mapping[str, str], run_dir: str, resume_from: Optional[str], run_id: str, attempt: int,
               events: str, settings_path: str, progress_path: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in PRIVATE_ENV}
    env.update({protocol.ENV_DIR: run_dir, protocol.ENV_RESUME_FROM: resume_from or "",
                protocol.ENV_RUN_ID: run_id, protocol.ENV_ATTEMPT: str(attempt), protocol.ENV_EVENTS: events,
                protocol.ENV_CONFIG: settings_path, protocol.ENV_PROGRESS: progress_path,
                ENV_DAEMON_PID: str(os.getpid())})
    return env


def check_command(command: Sequence[str], env: Mapping[str, str]) -> None:
    """A command that cannot run at all is a configuration error, said before anything starts."""
    program = command[0]
    if os.sep in program:
        if not os.path.exists(program):
            raise ConfigError(f"command not found: {program!r}; check the command after --")
        if not os.access(program, os.X_OK) or os.path.isdir(program):
            raise ConfigError(f"command not executable: {program!r}")
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise ConfigError(f"command not found: {program!r}; check the command after --")


class SpawnError(OSError):
    """The worker could not be started (fork failed, the program vanished): worth retrying later."""


OOM_SCORE_ADJ = "/proc/self/oom_score_adj"
# The worker must not inherit the daemon's protection from the OOM killer (the unit's
# OOMScoreAdjust=-500), and its score must be right before its first instruction: a wrapper (sh -c,
# torchrun) forks at once, and children inherit the score. Writing /proc/<pid>/oom_score_adj after
# the spawn races with that; preexec_fn runs Python between fork and exec in a process with threads
# (it can deadlock). So the worker starts through this exec shim: an isolated interpreter that sets
# its own score and execs the command (same pid, group, fds and environment). It reports through a
# close-on-exec pipe: a score it may not set, and why exec failed (nothing at all on success).
_SHIM = """import os, sys
fd, score, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
os.set_inheritable(fd, False)
try:
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(score)
except OSError as exc:
    os.write(fd, ("oom %s\\n" % (exc.strerror or exc)).encode())
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    os.write(fd, ("exec %d %s\\n" % (exc.errno or 5, exc.strerror or exc)).encode())
    os._exit(127)
"""


def own_oom_score_adj() -> Optional[int]:
    """The daemon's own OOM score adjustment (None where /proc does not tell)."""
    try:
        with open(OOM_SCORE_ADJ, "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


class WorkerProcess:
    """One running worker and everything it starts."""

    oom_warned = False  # a score the daemon may not give is said once, not at every restart

    def __init__(self, command: Sequence[str], env: Mapping[str, str], *, keep_fds: Iterable[int] = (),
                 stdout: Optional[int] = None, stderr: Optional[int] = None,
                 oom_score_adj: Optional[int] = None) -> None:
        options = dict(env=dict(env), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, process_group=0,
                       close_fds=True)
        try:
            if oom_score_adj is None or oom_score_adj == own_oom_score_adj():
                self._popen = subprocess.Popen(list(command), pass_fds=tuple(keep_fds), **options)
            else:  # the score differs from the inherited one: set it before the worker's first instruction
                self._popen = self._through_shim(command, oom_score_adj, tuple(keep_fds), options)
        except OSError as exc:
            raise SpawnError(exc.errno or errno.EIO, f"cannot start {command[0]!r}: {exc.strerror or exc}") from None
        self.pid = self._popen.pid
        self.pgid = self.pid  # process_group=0 makes the worker its group's leader
        self._owned: dict[int, bool] = {}
        self.known: set[int] = {self.pid}  # every process of it seen so far (to kill after its parent died)
        self._status: Optional[tuple[Optional[int], Optional[int]]] = None

    @classmethod
    def _through_shim(cls, command: Sequence[str], score: int, keep_fds: tuple[int, ...],
                      options: dict) -> subprocess.Popen:
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            popen = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SHIM, str(write_fd), str(score), *command],
                                     pass_fds=(*keep_fds, write_fd), **options)
        finally:
            os.close(write_fd)
        with os.fdopen(read_fd, "rb") as report:  # EOF once the command runs (or the shim is gone)
            lines = report.read(4096).decode("utf-8", "replace").splitlines()
        for line in lines:
            what, _, detail = line.partition(" ")
            if what == "oom" and not cls.oom_warned:
                cls.oom_warned = True
                log.warning("cannot set the worker's oom_score_adj to %d (%s; a score below the daemon's own needs "
                            "CAP_SYS_RESOURCE): it runs at %s", score, detail, own_oom_score_adj())
            elif what == "exec":
                popen.wait()
                number, _, reason = detail.partition(" ")
                raise OSError(int(number) if number.isdigit() else errno.EIO, reason)
        return popen

    def owns(self, pid: int) -> bool:
        """Whether `pid` is one of this worker's processes: in its process group, or a descendant."""
        if pid == self.pid:
            return True
        known = self._owned.get(pid)
        if known is None:
            known = self._owned[pid] = _in_group(pid, self.pgid) or _descends_from(pid, self.pid)
            if known:
                self.known.add(pid)
        return known

    def poll(self) -> Optional[tuple[Optional[int], Optional[int]]]:
        """(exit code, None) once it has exited, (None, signal) when a signal ended it; None while it runs."""
        if self._status is None:
            reap_children(self)
        return self._status

    def _reaped(self) -> set[int]:
        """The main process' pid once it was reaped (no longer its own), else nothing."""
        return {self.pid} if self._status is not None else set()

    def exited(self, wait_status: int) -> None:
        code = os.waitstatus_to_exitcode(wait_status)
        self._popen.returncode = code  # reaped here, not by Popen
        self._status = (code, None) if code >= 0 else (None, -code)

    def send(self, signum: int, pids: Iterable[int] = ()) -> None:
        """A signal to the announced processes (`pids`), or to the main process when none announced.
        Never to the main process once reaped (a dead worker is handled only once its hand-overs are
        committed, and meanwhile its pid may go to another process)."""
        for pid in (set(pids) or {self.pid}) - self._reaped():
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_tree(self) -> None:
        """SIGKILL the worker's group, and every descendant in another group or session (including
        those whose parent died: the daemon is their subreaper)."""
        reaped = self._reaped()  # its pid may be another process's by now: not it, nor that one's group
        self.known.update((set() if reaped else descendants(self.pid)) | descendants(os.getpid()))
        alive = self.known - reaped
        # A group keeps its leader's pid from reuse while it has members: a live process of that pid
        # after the leader was reaped means the group is empty, and that process is another's.
        groups = set() if reaped and _exists(self.pid) else {self.pgid}
        for pid in alive:
            try:
                groups.add(os.getpgid(pid))
            except OSError:
                pass
        for pgid in groups:
            if pgid == os.getpgrp():
                continue  # never the daemon's own group
            _kill_group(pgid)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def become_subreaper() -> bool:
    """Orphaned descendants of the worker become the daemon's children, so it can find and kill
    them (Linux PR_SET_CHILD_SUBREAPER; False where that is not available)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_children(worker: Optional[WorkerProcess]) -> None:
    """Collect every exited child: the worker's status goes to it, orphans that ended are let go."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if worker is not None and pid == worker.pid:
            worker.exited(status)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            log.warning("cannot kill process group %d: %s", pgid, exc)


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


def descendants(root: int) -> set[int]:
    """Every process below `root` now (from /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = parent_of(int(name))
            if parent is not None:
                children.setdefault(parent, []).append(int(name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
