"""The contract between the daemon and the worker: environment, exit codes, event datagrams.

Events are small JSON datagrams on an AF_UNIX socket (the same shape as sd_notify: a path, or
`@name` for an abstract socket). Sending never blocks and never fails the caller: a worker without
a daemon, or a daemon that is gone, just drops them.
"""
from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Mapping, Optional

ENV_DIR = "SAVEGAME_DIR"
ENV_RESUME_FROM = "SAVEGAME_RESUME_FROM"
ENV_RUN_ID = "SAVEGAME_RUN_ID"
ENV_ATTEMPT = "SAVEGAME_ATTEMPT"
ENV_EVENTS = "SAVEGAME_EVENTS"
ENV_CONFIG = "SAVEGAME_CONFIG"  # JSON file of the settings the user gave the daemon (an addition)
ENV_PROGRESS = "SAVEGAME_PROGRESS"  # 8-byte file the worker writes its step into (an addition)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_CHECKPOINT = 65  # EX_DATAERR: the resume checkpoint failed verification while loading
EXIT_SAVED_RESUME_ME = 75  # EX_TEMPFAIL: emergency checkpoint committed, resume me
EXIT_CONFIG = 78  # EX_CONFIG: never retried

MAX_DATAGRAM = 16 * 1024


def socket_address(address: str) -> str | bytes:
    """'@name' is an abstract socket (no file), anything else a path."""
    return "\0" + address[1:] if address.startswith("@") else address


class DatagramSender:
    """Fire-and-forget JSON datagrams to one address."""

    def __init__(self, address: Optional[str]) -> None:
        self.address = address
        self._sock: Optional[socket.socket] = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    def send_raw(self, payload: bytes) -> bool:
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(payload, socket_address(self.address))
            return True
        except OSError:
            return False  # nobody listening, or the queue is full: events are best-effort

    def send(self, event: str, **fields: Any) -> bool:
        return self.send_raw(json.dumps({"event": event, "pid": os.getpid(), **fields}).encode())

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class ProgressCell:
    """The worker's current step in an 8-byte shared file: written at every step boundary for the
    cost of a memory store (no syscall), read by the daemon when the worker dies, so "it keeps
    dying at the same step" is known exactly, whatever the heartbeat rate."""

    NONE = -1

    def __init__(self, path: str, create: bool = False) -> None:
        import mmap

        if create:
            with open(path, "wb") as f:
                f.write(struct.pack("<q", self.NONE))
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), 8)

    def write(self, step: int) -> None:
        struct.pack_into("<q", self._map, 0, step)

    def read(self) -> Optional[int]:
        (step,) = struct.unpack_from("<q", self._map, 0)
        return None if step == self.NONE else step

    def close(self) -> None:
        self._map.close()
        self._file.close()


def parse_event(payload: bytes) -> Optional[Mapping[str, Any]]:
    try:
        event = json.loads(payload)
    except ValueError:
        return None
    return event if isinstance(event, dict) and isinstance(event.get("event"), str) else None
