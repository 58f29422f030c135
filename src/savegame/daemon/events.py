"""The daemon's end of the worker events: an abstract AF_UNIX datagram socket."""
from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Mapping

from savegame.protocol import MAX_DATAGRAM, parse_event, socket_address


class EventInbox:
    def __init__(self) -> None:
        self.address = f"@savegame-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(socket_address(self.address))
        self.sock.setblocking(False)

    def fileno(self) -> int:
        return self.sock.fileno()

    def drain(self) -> list[Mapping[str, Any]]:
        events = []
        while True:
            try:
                payload = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return events
            event = parse_event(payload)
            if event is not None:
                events.append(event)

    def close(self) -> None:
        self.sock.close()
