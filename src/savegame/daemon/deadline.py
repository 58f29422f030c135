"""Remote calls with a deadline the daemon can rely on.

Client timeouts do not cover every stall (a server that accepts connections and never answers, a
DNS lookup that hangs), so the call runs in a helper thread and the caller waits at most the
deadline. A call that overruns is abandoned: it finishes or fails on its own, and `Abandoned`
carries its thread so the caller can tell when it is really over.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, TypeVar

from savegame.errors import StorageError

T = TypeVar("T")


class Abandoned(StorageError):
    """A call overran its deadline (or was set aside); it may still be running."""

    def __init__(self, message: str, thread: threading.Thread, set_aside: bool = False) -> None:
        super().__init__(message)
        self.thread = thread
        self.set_aside = set_aside  # given up for something more urgent, not for being late


def call_with_deadline(operation: Callable[[Callable[[], bool]], T], timeout_s: float, what: str, *,
                       set_aside: Callable[[], bool] = lambda: False, poll_s: float = 0.1) -> T:
    """`operation(cancelled)` in a helper thread; its result, or its exception, within `timeout_s`.

    `cancelled()` turns true once the call is abandoned (a copy loop can stop early). When
    `set_aside()` turns true first, the call is abandoned too (Abandoned.set_aside)."""
    outcome: dict[str, Any] = {}
    done = threading.Event()
    cancel = threading.Event()

    def call() -> None:
        try:
            outcome["value"] = operation(cancel.is_set)
        except BaseException as exc:  # handed back to the caller below
            outcome["error"] = exc
        finally:
            done.set()

    helper = threading.Thread(target=call, name=f"savegame-call: {what}"[:60], daemon=True)
    helper.start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(min(poll_s, max(0.0, deadline - time.monotonic()))):
        aside = set_aside()
        if aside or time.monotonic() >= deadline:
            cancel.set()
            why = "set aside for an urgent one" if aside else f"took longer than {timeout_s:g}s"
            raise Abandoned(f"{what}: {why}", helper, set_aside=aside)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def with_deadline(operation: Callable[[], T], timeout_s: float, what: str) -> T:
    """A call that cannot be cancelled, with a deadline (see call_with_deadline)."""
    return call_with_deadline(lambda cancelled: operation(), timeout_s, what)

