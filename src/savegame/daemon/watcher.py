"""A backstop for worker events: watch the run folder for checkpoints that appear by rename.

Events can be lost (a datagram dropped, a worker that does not use the library); a new
`ckpt-*` folder in the run root never is. The observer runs in its own thread and only wakes
the supervisor's loop, which then re-reads the listing.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

from savegame.storage import step_of_folder

log = logging.getLogger("savegame")


class FolderWatcher:
    def __init__(self, root: str, on_change: Callable[[], None]) -> None:
        self.root = root
        self._on_change = on_change
        self._observer: Optional[object] = None

    def start(self) -> None:
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover - watchdog is a dependency; stay useful without it
            log.warning("watchdog is not installed: relying on worker events only")
            return
        notify = self._on_change

        class Handler(FileSystemEventHandler):  # type: ignore[misc]
            def on_any_event(self, event) -> None:  # noqa: ANN001
                path = getattr(event, "dest_path", "") or event.src_path
                name = os.path.basename(os.fsdecode(path).rstrip("/"))
                if event.is_directory and step_of_folder(name) is not None:
                    notify()

        observer = Observer()
        observer.daemon = True
        observer.schedule(Handler(), self.root, recursive=False)
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()  # type: ignore[attr-defined]
            self._observer = None
