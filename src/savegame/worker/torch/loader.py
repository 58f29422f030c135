"""DataLoader worker processes: shielded from stop requests meant for the training process, and
passing tensors through a temp folder that a killed run does not leave behind for good.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from typing import Any

from savegame.storage.local import process_alive

TEMP_PREFIX = "pymp-sg"  # + "<pid>-<random>": like multiprocessing's own pymp-*, with its owner's pid
_TEMP_NAME = re.compile(rf"^{TEMP_PREFIX}(\d+)-")
_prepared = False


def shield_loader_workers(loader: Any) -> None:
    """Make a DataLoader's worker processes survive stop and checkpoint requests meant for the main one,
    and share a temp folder this process owns (see own_temp_folder)."""
    if getattr(loader, "num_workers", 0) <= 0:
        return
    own_temp_folder()
    if not isinstance(loader.worker_init_fn, StopSignalShield):
        loader.worker_init_fn = StopSignalShield(loader.worker_init_fn)


class StopSignalShield:
    """A DataLoader `worker_init_fn` (wrapping the user's) for workers that outlive a stop request.

    A SIGTERM to the whole process group (systemd's default KillMode, SLURM's scancel, `kill -TERM
    -PGID`) would kill the DataLoader workers, and PyTorch would then raise in the main process in
    the middle of its emergency save. Shielded workers ignore SIGTERM unless it comes from the main
    process itself (multiprocessing's terminate() at exit) or the main process is gone; the main
    process saves, then shuts them down as usual. SIGUSR1 (checkpoint now) is ignored outright.
    """

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        parent = os.getppid()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started later inherit it
        threading.Thread(target=_await_sigterm, args=(parent,), name="savegame-sigterm", daemon=True).start()
        if self.inner is not None:
            self.inner(worker_id)


def _await_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(128 + signal.SIGTERM)




def own_temp_folder() -> None:
    """Give multiprocessing, before the DataLoader starts its workers, a temp folder named after this
    process; the workers inherit it. They put the sockets that pass tensors to this process there
    (multiprocessing's resource sharer). When the daemon SIGKILLs the group (a crash, a hang, the
    grace period ran out), nothing removes it: the next run removes the folders of dead owners.
    Without this, each killed worker left a pymp-* folder in the temp folder for good."""
    global _prepared
    if _prepared:
        return
    _prepared = True
    import multiprocessing.process
    import multiprocessing.util

    base = tempfile.gettempdir()
    collect_temp_folders(base)
    config = multiprocessing.process.current_process()._config
    if config.get("tempdir") is None:  # else this process already has one, and the workers share it
        try:
            folder = tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=base)
        except OSError:
            return  # multiprocessing makes its own, as without savegame
        config["tempdir"] = folder
        # removed at a normal exit, last, like multiprocessing's own (children do not inherit finalizers)
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(folder, True), exitpriority=-100)


def collect_temp_folders(base: str) -> list[str]:
    """Remove the temp folders of training processes that no longer run; returns what was removed."""
    removed = []
    try:
        names = os.listdir(base)
    except OSError:
        return removed
    for name in names:
        match = _TEMP_NAME.match(name)
        if match and int(match.group(1)) != os.getpid() and not process_alive(int(match.group(1))):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
            removed.append(name)
    return removed
