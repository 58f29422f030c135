"""The daemon's end of the worker events: a datagram socket in a private folder.

Only this user's processes can reach it (the folder is 0700, the socket is not abstract). The
kernel-checked sender credentials (SO_PASSCRED) are checked before a byte of a datagram is parsed:
only the worker's own processes count (the supervisor says which). What passes is parsed by the
strict parser; anything else is dropped and counted, and one tick handles a bounded number.
"""
from __future__ import annotations

import collections
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
    def __init__(self, runtime_dir: Optional[str] = None) -> None:
        self._folder = tempfile.mkdtemp(prefix="savegame-", dir=_runtime_dir(runtime_dir))  # mode 0700
        self.address = os.path.join(self._folder, "events")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.address)
        self.sock.setblocking(False)
        self.dropped: collections.Counter[str] = collections.Counter()  # why -> how many

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


def _runtime_dir(given: Optional[str]) -> Optional[str]:
    """Where the socket's folder goes: $XDG_RUNTIME_DIR when usable, else the temp folder."""
    for candidate in (given, os.environ.get("XDG_RUNTIME_DIR")):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK) \
                and len(candidate) < _SUN_PATH_MAX - 32:
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
