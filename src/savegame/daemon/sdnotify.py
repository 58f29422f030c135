"""sd_notify: READY, STATUS, WATCHDOG, STOPPING and EXTEND_TIMEOUT_USEC to systemd.

One datagram per message to $NOTIFY_SOCKET (`@name` is an abstract socket). Without the variable
(not under systemd) every call is a no-op.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, Mapping, Optional

from savegame.protocol import DatagramSender

BUSY_PING_S = 5.0


class Notifier:
    def __init__(self, env: Mapping[str, str] = os.environ) -> None:
        self._sender = DatagramSender(env.get("NOTIFY_SOCKET") or None)
        self.watchdog_interval_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._sender.address is not None

    def notify(self, *lines: str) -> None:
        if self.enabled:
            self._sender.send_raw("\n".join(lines).encode())

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def extend_timeout(self, seconds: float) -> None:
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    @contextlib.contextmanager
    def busy(self, what: str) -> Iterator[None]:
        """A long, bounded operation on the main loop (a download, the final upload): keep systemd's
        watchdog and start/stop timeouts fed from a helper thread meanwhile, saying what it is."""
        if not self.enabled:
            yield
            return
        self.status(what)
        done = threading.Event()
        interval = min(self.watchdog_interval_s or BUSY_PING_S, BUSY_PING_S)

        def ping() -> None:
            while not done.wait(interval):
                self.watchdog()
                self.extend_timeout(interval * 3)

        helper = threading.Thread(target=ping, name="savegame-sd-busy", daemon=True)
        helper.start()
        try:
            yield
        finally:
            done.set()
            helper.join()


def _watchdog_interval(env: Mapping[str, str]) -> Optional[float]:
    """Ping at half of WATCHDOG_USEC, if the watchdog is meant for this process."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1_000_000 / 2
    except ValueError:
        return None
