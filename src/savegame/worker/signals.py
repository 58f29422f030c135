"""Worker-side signal handling. Handlers only record; the step boundary acts.

SIGTERM: stop request (save at the next step boundary, exit 75). SIGUSR1: checkpoint now.
SIGUSR2: dump every thread's stack to stderr (the daemon asks for it before killing a hung worker).
"""
from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from typing import Any


class StopRequests:
    def __init__(self) -> None:
        self.stop = False
        self.checkpoint = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_checkpoint)
        try:
            faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor
            pass

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop = True

    def _on_checkpoint(self, signum: int, frame: Any) -> None:
        self.checkpoint = True

    def take_checkpoint(self) -> bool:
        requested, self.checkpoint = self.checkpoint, False
        return requested
