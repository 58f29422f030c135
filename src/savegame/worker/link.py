"""The worker's line to its daemon: hello, heartbeats, commits, the progress cell.

Without a daemon (no SAVEGAME_EVENTS) every call is a no-op, so a script runs the same on its own.
Sending never blocks; a daemon that is gone (kill -9) shows up as `gone`, and the Checkpointer
treats that like a stop request.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Optional

from savegame import protocol

HEARTBEAT_INTERVAL_S = protocol.HEARTBEAT_INTERVAL_S


class DaemonLink:
    """Events to the daemon. `status()` gives the fields every report carries (step, epoch, ...)."""

    def __init__(self, status: Callable[[], Mapping[str, Any]], environ: Mapping[str, str] = os.environ) -> None:
        self.address = environ.get(protocol.ENV_EVENTS) or None
        self._status = status
        self._events = protocol.DatagramSender(self.address)
        progress_path = environ.get(protocol.ENV_PROGRESS)
        self._cell = protocol.ProgressCell(progress_path) if progress_path else None
        self._last_heartbeat = 0.0
        self._lock = threading.Lock()  # heartbeats come from the training and the keepalive threads

    @property
    def supervised(self) -> bool:
        return self.address is not None

    @property
    def gone(self) -> bool:
        """The daemon stopped listening (it died): nobody will restart or stop this worker. A missing
        socket file alone is not enough (a cleaner may have removed it; the daemon binds it again):
        then the daemon's own process must be gone too."""
        if self._events.peer_gone:
            return True
        if self._events.peer_missing:
            self._events.peer_missing = False
            return not _daemon_alive()
        return False

    def send(self, event: str, **fields: Any) -> None:
        self._events.send(event, **fields)

    def try_send(self, event: str, **fields: Any) -> Optional[bool]:
        """See DatagramSender.try_send."""
        return self._events.try_send(event, **fields)

    def report(self, event: str, **extra: Any) -> None:
        """An event with the worker's status fields."""
        self._events.send(event, **self._status(), time=time.time(), **extra)

    def boundary(self, step: int) -> None:
        """A step boundary: the step into the shared cell (a memory store), a heartbeat when due."""
        if self._cell is not None:
            self._cell.write(step)
        self.heartbeat()

    def heartbeat(self, force: bool = False, **extra: Any) -> bool:
        """Report a heartbeat, at most one per HEARTBEAT_INTERVAL_S unless `force`; True if sent."""
        if not self.supervised:
            return False
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
                return False
            self._last_heartbeat = now
        self.report("heartbeat", **extra)
        return True

    @contextlib.contextmanager
    def keepalive(self, activity: str) -> Iterator[None]:
        """Heartbeats from a helper thread while the block runs (a long evaluation has no step boundary)."""
        if not self.supervised:
            yield
            return
        done = threading.Event()

        def beat() -> None:
            while not done.wait(HEARTBEAT_INTERVAL_S):
                self.heartbeat(force=True, activity=activity)

        self.heartbeat(force=True, activity=activity)
        thread = threading.Thread(target=beat, name="savegame-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def hello(self, handles: list[str]) -> None:
        """Announce the training process: the daemon signals this pid (not a wrapper's), and sends
        SIGUSR1 only when it is handled."""
        rank, world_size = process_rank()
        local = os.environ.get("LOCAL_RANK", "")  # torchrun's: this rank's number on its node
        extra = {"local_rank": int(local)} if local.isdigit() else {}
        self._events.send(protocol.EVENT_HELLO, handles=handles, rank=rank, world_size=world_size, **extra)

    def close(self) -> None:
        self._events.close()


def process_rank() -> tuple[int, int]:
    """(rank, world size) under an initialized torch.distributed, else (0, 1). Never imports torch."""
    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except (RuntimeError, ValueError):
        pass
    rank, world = os.environ.get("RANK", ""), os.environ.get("WORLD_SIZE", "")  # torchrun's, before init
    return (int(rank), int(world)) if rank.isdigit() and world.isdigit() else (0, 1)



def daemon_alive() -> bool:
    """Whether the daemon that started this worker still runs (True without one to ask)."""
    return _daemon_alive()


def _daemon_alive() -> bool:
    from savegame.storage.pids import parse_pid, process_alive

    pid = parse_pid(os.environ.get("SAVEGAME_DAEMON_PID", ""))
    return pid is None or process_alive(pid)  # without the variable, assume it lives (never a false stop)
