"""The contract between the daemon and the worker: environment, exit codes, event datagrams.

Events are small JSON datagrams on an AF_UNIX socket (the same shape as sd_notify: a path, or
`@name` for an abstract socket). Sending never blocks and never fails the caller: a worker without
a daemon just drops them, and one whose daemon is gone learns it (`peer_gone`) and stops with an
emergency checkpoint.

The training process announces itself with a `hello` event (its pid, the signals it handles, its
rank), so the daemon signals that process even behind a wrapper (`sh -c`, `conda run`, torchrun)
and sends SIGUSR1 only to a process that handles it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import struct
from typing import Any, Optional

ENV_DIR = "SAVEGAME_DIR"
ENV_RESUME_FROM = "SAVEGAME_RESUME_FROM"
ENV_RUN_ID = "SAVEGAME_RUN_ID"
ENV_ATTEMPT = "SAVEGAME_ATTEMPT"
ENV_EVENTS = "SAVEGAME_EVENTS"
ENV_CONFIG = "SAVEGAME_CONFIG"  # JSON file of the settings the user gave the daemon (an addition)
ENV_PROGRESS = "SAVEGAME_PROGRESS"  # 8-byte file the worker writes its step into (an addition)
ENV_RELIABILITY = "SAVEGAME_RELIABILITY"  # {"failures": n, "observed_s": t}: the run's record, for the MTBF
ENV_SEGMENTS = "SAVEGAME_SEGMENTS"  # the daemon's private /dev/shm folder: hand snapshots over there
ENV_RESTORE_SEGMENT = "SAVEGAME_RESTORE_SEGMENT"  # the checkpoint to resume from, kept there in RAM

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_CHECKPOINT = 65  # EX_DATAERR: the resume checkpoint failed verification while loading
EXIT_IO = 74  # EX_IOERR (daemon): checkpoints did not reach where they must (the mirror, a full disk)
EXIT_SAVED_RESUME_ME = 75  # EX_TEMPFAIL: emergency checkpoint committed, resume me
EXIT_ROLLBACK = 76  # the loss went bad (NaN, a spike): worker: roll me back; daemon: more often than rollback.max
EXIT_CONFIG = 78  # EX_CONFIG: never retried

MAX_DATAGRAM = 16 * 1024
EVENT_HELLO = "hello"  # the training process announces itself: pid, handles, rank, world_size
EVENT_SNAPSHOT = "snapshot"  # a segment handed over for the daemon to commit: segment (its name), step, seq
# The worker sends a heartbeat at the first step boundary at least this long after its last one (and
# every interval inside a keepalive); the daemon bounds step times with it.
HEARTBEAT_INTERVAL_S = 0.5
_PEER_GONE = (errno.ECONNREFUSED, errno.ENOTCONN)  # the socket is there, nobody is bound to it


def socket_address(address: str) -> str | bytes:
    """'@name' is an abstract socket (no file), anything else a path."""
    return "\0" + address[1:] if address.startswith("@") else address


class DatagramSender:
    """Fire-and-forget JSON datagrams to one address."""

    def __init__(self, address: Optional[str]) -> None:
        self.address = address
        self.peer_gone = False  # the receiver is gone (the daemon died): nobody listens any more
        self.peer_missing = False  # its socket file is missing: the daemon died, or the file was removed
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
        except OSError as exc:  # the queue is full (events are best-effort), or nobody listens
            if exc.errno in _PEER_GONE:
                self.peer_gone = True
            elif exc.errno == errno.ENOENT:
                self.peer_missing = True
            return False

    def send(self, event: str, **fields: Any) -> bool:
        return self.send_raw(json.dumps({"event": event, "pid": os.getpid(), **fields}).encode())

    def try_send(self, event: str, **fields: Any) -> Optional[bool]:
        """An event that must arrive: True when sent, None when the daemon's queue is full (try
        again), False when nobody listens."""
        if self._sock is None or self.address is None:
            return False
        try:
            self._sock.sendto(json.dumps({"event": event, "pid": os.getpid(), **fields}).encode(),
                              socket_address(self.address))
            return True
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _PEER_GONE:
                self.peer_gone = True
            elif exc.errno == errno.ENOENT:
                self.peer_missing = True
            return False

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

        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC  # never through a planted symlink
        if create:
            flags |= os.O_CREAT | os.O_TRUNC
        fd = os.open(path, flags, 0o644)
        try:
            if create:
                os.write(fd, struct.pack("<q", self.NONE))
            self._map = mmap.mmap(fd, 8)
        finally:
            os.close(fd)  # the mapping keeps what it needs

    def write(self, step: int) -> None:
        struct.pack_into("<q", self._map, 0, step)

    def read(self) -> Optional[int]:
        (step,) = struct.unpack_from("<q", self._map, 0)
        return None if step == self.NONE else step

    def close(self) -> None:
        self._map.close()
