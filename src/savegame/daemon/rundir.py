"""The run folder and its mirror: opened, checked, locked (one daemon per folder), and its run id."""
from __future__ import annotations

import fcntl
import logging
import os
import uuid

from savegame.config import RunConfig
from savegame.daemon.status import STATUS_DIR
from savegame.errors import ConfigError, StorageError
from savegame.storage import CheckpointStore

log = logging.getLogger("savegame")


def open_run_folder(path: str) -> CheckpointStore:
    store = CheckpointStore(path)
    if not store.is_local:
        raise ConfigError(f"--dir must be a local folder, not {store.url}; use --mirror for object storage")
    try:
        os.makedirs(os.path.join(store.location.path, STATUS_DIR), exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the run folder {store.location.path}: {exc.strerror}") from None
    return store


def open_mirror(config: RunConfig) -> CheckpointStore:
    remote = CheckpointStore(config["mirror"], config["storage"])
    if remote.is_local:
        return remote  # a second local folder (another disk) is a fine mirror too
    try:
        reachable = remote.exists()
    except StorageError as exc:
        log.warning("the mirror %s is not reachable now (%s); uploads will retry", remote.url, exc)
        return remote
    if not reachable:
        raise ConfigError(f"the mirror {remote.url} does not exist: create the bucket first")
    return remote


def lock_run_folder(run_dir: str) -> int:
    """One daemon per run folder: two would fight over the worker, retention and the mirror."""
    fd = os.open(os.path.join(run_dir, STATUS_DIR, "daemon.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(f"another `savegame run` (pid {holder}) already supervises {run_dir}; "
                          "stop it first, or use another --dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd  # held until the process exits


def run_id_of(run_dir: str) -> str:
    """One id per run folder, kept across daemon restarts (a reboot continues the same run)."""
    path = os.path.join(run_dir, STATUS_DIR, "run_id")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except FileNotFoundError:
        run_id = uuid.uuid4().hex[:12]
        with open(path, "w", encoding="utf-8") as f:
            f.write(run_id)
        return run_id
