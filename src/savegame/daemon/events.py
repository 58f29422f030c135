"""The daemon's end of the worker events: a datagram socket in a folder only the daemon owns.

The socket lives in the run folder's `.savegame/` (checked: ours, not writable by others) when the
path fits an AF_UNIX address, else in a private folder (0700) under systemd's $RUNTIME_DIRECTORY or
the temp folder; never in $XDG_RUNTIME_DIR, which logind removes when the user logs out. If it is
removed anyway (a cleaner of old temp files), `check()` binds it again at the same address, so the
running worker is heard again without a restart. The kernel-checked sender credentials
(SO_PASSCRED) are checked before a byte of a datagram is parsed: only the worker's own processes
count (the supervisor says which). What passes is parsed by the strict parser; anything else is
dropped and counted, and one tick handles a bounded number.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import socket
import struct
import tempfile
from typing import Any, Callable, Mapping, Optional

from savegame.errors import MalformedInput
from savegame.protocol import MAX_DATAGRAM
from savegame.untrusted import load_json, obj

log = logging.getLogger("savegame")
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
MAX_PER_TICK = 256  # a flood cannot starve the loop: the rest waits for the next tick
MAX_EVENT_DEPTH = 8
_SUN_PATH_MAX = 107

Accept = Callable[[int, int], bool]  # (sender pid, sender uid) -> whether its events count


class EventInbox:
    def __init__(self, run_dir: Optional[str] = None, name: str = "events.sock") -> None:
        """`name`: one per daemon of the folder (several nodes of a job share it: events.<node>.sock)."""
        own = os.path.join(run_dir, ".savegame", name) if run_dir else None
        if own is not None and len(own.encode()) <= _SUN_PATH_MAX:
            self._folder, self._made_folder = os.path.dirname(own), False
        else:  # a run folder too deep for an AF_UNIX address
            self._folder, self._made_folder = tempfile.mkdtemp(prefix="savegame-", dir=_runtime_dir()), True
        self.address = os.path.join(self._folder, name)
        self.dropped: collections.Counter[str] = collections.Counter()  # why -> how many
        self.sock = self._bind()

    def _bind(self) -> socket.socket:
        if self._made_folder and not os.path.isdir(self._folder):
            os.mkdir(self._folder, 0o700)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)  # a socket left by a daemon that was killed
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.bind(self.address)
        os.chmod(self.address, 0o600)  # only this user may send (the kernel checks write permission)
        sock.setblocking(False)
        self._inode = os.stat(self.address).st_ino
        return sock

    def lost(self) -> bool:
        """Whether the socket file was removed or replaced (then `rebind()`)."""
        try:
            return os.lstat(self.address).st_ino != self._inode
        except FileNotFoundError:
            return True

    def rebind(self) -> None:
        """Bind again at the same address: the running worker is heard again, no restart needed."""
        log.warning("the event socket %s was removed: binding it again", self.address)
        self.sock.close()
        self.sock = self._bind()

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, accept: Accept, limit: int = MAX_PER_TICK) -> list[Mapping[str, Any]]:
        """Up to `limit` events waiting on the socket from senders `accept` admits (the rest is dropped)."""
        events = []
        for _ in range(limit):
            try:
                payload, ancillary, _flags, _address = self.sock.recvmsg(
                    MAX_DATAGRAM + 1, socket.CMSG_SPACE(_CREDENTIALS.size))
            except (BlockingIOError, InterruptedError):
                break
            sender = _sender(ancillary)
            if sender is None or not accept(*sender):
                self._drop("foreign", sender)
                continue
            event = parse_event(payload, sender[0])
            if event is None:
                self._drop("malformed", sender)
                continue
            events.append(event)
        return events

    def _drop(self, why: str, sender: Optional[tuple[int, int]]) -> None:
        self.dropped[why] += 1
        count = self.dropped[why]
        if count & (count - 1) == 0:  # the 1st, 2nd, 4th, 8th, ...: a flood cannot flood the log
            who = f"pid {sender[0]}, uid {sender[1]}" if sender else "an unknown sender"
            log.warning("dropped a %s event datagram from %s (%d so far)", why, who, count)

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.address)
        if self._made_folder:
            shutil.rmtree(self._folder, ignore_errors=True)


def parse_event(payload: bytes, pid: int) -> Optional[Mapping[str, Any]]:
    """A worker event, or None when the datagram is not one (too big, not JSON, not an event)."""
    try:
        event = obj(load_json(payload, what=f"event from pid {pid}", max_bytes=MAX_DATAGRAM,
                              max_depth=MAX_EVENT_DEPTH), "event")
    except MalformedInput:
        return None
    kind = event.get("event")
    if not isinstance(kind, str) or len(kind) > 64:
        return None
    event["pid"] = pid  # the kernel's word, not the sender's
    return event


def _sender(ancillary: list[tuple[int, int, bytes]]) -> Optional[tuple[int, int]]:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
            pid, uid, _gid = _CREDENTIALS.unpack_from(data)
            return pid, uid
    return None


def _runtime_dir() -> Optional[str]:
    """systemd's RuntimeDirectory= for the unit when set and usable, else the temp folder (never
    $XDG_RUNTIME_DIR: it belongs to a login session and goes away with it)."""
    candidate = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK) \
            and len(candidate) < _SUN_PATH_MAX - 40:
        return candidate
    return None


def number(event: Mapping[str, Any], key: str) -> Optional[float]:
    """A numeric field of an event, or None when it is missing or not a number."""
    value = event.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def next_heartbeat(previous: Mapping[str, Any], event: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The worker's latest step, and a smoothed steps/s from the heartbeats so far."""
    step = int(number(event, "step") or 0)
    rate = previous.get("steps_per_s") or 0.0
    if previous.get("time") and step > previous.get("step", 0) and now > previous["time"]:
        current = (step - previous["step"]) / (now - previous["time"])
        rate = current if not rate else 0.7 * rate + 0.3 * current
    epoch = number(event, "epoch")
    monitor = event.get("monitor")
    return {"step": step, "epoch": None if epoch is None else int(epoch), "time": now, "steps_per_s": rate,
            "monitor": monitor[:200] if isinstance(monitor, str) else None, "best": number(event, "best")}
