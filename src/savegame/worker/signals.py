"""Worker-side signal handling, only while training. Handlers only record; the step boundary acts.

SIGTERM: stop request (save at the next step boundary, exit 75). SIGUSR1: checkpoint now.
SIGINT (Ctrl-C): the first is a stop request like SIGTERM, a second interrupts at once.
SIGUSR2: dump every thread's stack to stderr (the daemon asks for it before killing a hung worker).

`install()` takes them over at the first training call and `restore()` gives the previous handlers
back, so a script that only loads weights (an inference server) keeps its own behaviour. A signal
the process was told to ignore (nohup, a background job's SIGINT, the script's SIG_IGN) stays ignored.
"""
from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from typing import Any, Callable, Optional

Handler = Any  # what signal.getsignal returns: a callable, SIG_DFL, SIG_IGN or None


class StopRequests:
    def __init__(self) -> None:
        self.stop = False
        self.checkpoint = False
        self.interrupted = False  # the stop came from SIGINT (Ctrl-C)
        self.on_interrupt: Optional[Callable[[], None]] = None  # called at the first SIGINT
        self._previous: dict[int, Handler] = {}
        self._dumps_stacks = False

    @property
    def installed(self) -> bool:
        return bool(self._previous) or self._dumps_stacks

    def install(self) -> list[str]:
        """Take the signals over (from the main thread only); returns the names of those now handled."""
        if self.installed or threading.current_thread() is not threading.main_thread():
            return self.handled()
        for signum, handler in ((signal.SIGTERM, self._on_stop), (signal.SIGUSR1, self._on_checkpoint),
                                (signal.SIGINT, self._on_interrupt)):
            previous = signal.getsignal(signum)
            if previous is not signal.SIG_IGN:
                self._previous[signum] = previous
                signal.signal(signum, handler)
        try:
            faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)
            self._dumps_stacks = True
        except (AttributeError, ValueError, OSError):  # stderr without a file descriptor
            pass
        return self.handled()

    def handled(self) -> list[str]:
        order = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
        return [signal.Signals(s).name for s in order if s in self._previous]

    def restore(self) -> None:
        """Give the previous handlers back (from the main thread only)."""
        if not self.installed or threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}
        if self._dumps_stacks:
            faulthandler.unregister(signal.SIGUSR2)
            self._dumps_stacks = False

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.stop = True

    def _on_checkpoint(self, signum: int, frame: Any) -> None:
        self.checkpoint = True

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt  # the second Ctrl-C: quit at once, whatever is running
        self.interrupted = self.stop = True
        if self.on_interrupt is not None:
            self.on_interrupt()

    def take_checkpoint(self) -> bool:
        requested, self.checkpoint = self.checkpoint, False
        return requested
