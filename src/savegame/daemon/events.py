"""The daemon's end of the worker events: an abstract AF_UNIX datagram socket.

Abstract sockets have no file permissions, so the kernel-checked sender credentials (SO_PASSCRED)
decide whose datagrams count: only the current worker's main process is listened to.
"""
from __future__ import annotations

import os
import socket
import struct
import uuid
from typing import Any, Mapping, Optional

from savegame.protocol import MAX_DATAGRAM, parse_event, socket_address

_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class EventInbox:
    def __init__(self) -> None:
        self.address = f"@savegame-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(socket_address(self.address))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self, sender_pid: Optional[int]) -> list[Mapping[str, Any]]:
        """Events waiting on the socket that `sender_pid` sent (anything else is dropped)."""
        events = []
        while True:
            try:
                payload, ancillary, _flags, _address = self.sock.recvmsg(MAX_DATAGRAM, socket.CMSG_SPACE(
                    _CREDENTIALS.size))
            except (BlockingIOError, InterruptedError):
                return events
            event = parse_event(payload)
            if event is not None and sender_pid is not None and _sender(ancillary) == sender_pid:
                events.append(event)

    def close(self) -> None:
        self.sock.close()


def _sender(ancillary: list[tuple[int, int, bytes]]) -> Optional[int]:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
            return _CREDENTIALS.unpack_from(data)[0]
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
    return {"step": step, "epoch": event.get("epoch"), "time": now, "steps_per_s": rate}
