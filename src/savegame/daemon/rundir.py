"""The run folder and its mirror: opened, checked, locked (one writer per folder), and its run id.

The lock is a flock on `.savegame/daemon.lock` that the worker inherits: the folder stays locked
while any process of the run lives, even after the daemon was killed. A new daemon that finds the
lock held by the orphans of a dead one waits for them to finish their emergency checkpoint (they
learn of the death and stop on their own), then kills what is left.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import time
import uuid
from typing import Any, Optional

from savegame.config import RunConfig
from savegame.daemon.status import STATUS_DIR
from savegame.errors import ConfigError, MalformedInput, StorageError
from savegame.files import replace_file
from savegame.storage import CheckpointStore
from savegame.storage.local import check_run_folder, process_alive
from savegame.untrusted import load_json, read_regular_file

log = logging.getLogger("savegame")
LOCK_FILE = "daemon.lock"
ORPHAN_POLL_S = 0.2
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
_FULL = (errno.ENOSPC, errno.EDQUOT)


def open_run_folder(path: str) -> CheckpointStore:
    store = CheckpointStore(path)
    if not store.is_local:
        raise ConfigError(f"--dir must be a local folder, not {store.url}; use --mirror for object storage")
    folder = os.path.join(store.location.path, STATUS_DIR)
    try:
        os.makedirs(store.location.path, mode=0o750, exist_ok=True)
        check_run_folder(store.location.path)  # owned by us, not writable by others, no planted links
        os.makedirs(folder, mode=0o750, exist_ok=True)
        probe = os.path.join(folder, f".probe.{os.getpid()}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b"savegame")
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise folder_error(store.location.path, exc) from None
    return store


def folder_error(path: str, exc: OSError) -> Exception:
    """A run folder that cannot be written: a configuration error when it is read-only or not ours,
    an I/O error (worth retrying later) when the disk is full."""
    if exc.errno in _FULL:
        return StorageError(exc.errno, f"the run folder {path} is on a full disk ({exc.strerror}): "
                                       "free some space (or keep fewer checkpoints), then start again")
    if exc.errno in _READ_ONLY:
        return ConfigError(f"the run folder {path} is not writable ({exc.strerror}): fix its permissions "
                           "or mount, or give another --dir")
    return ConfigError(f"cannot use the run folder {path}: {exc.strerror or exc}")


def run_error(exc: OSError) -> Exception:
    """What an OSError from the daemon's own files in the run folder means for the user: a full or
    read-only disk (I/O: exit 74, worth retrying) or something in the way (configuration: exit 78)."""
    where = exc.filename or "the run folder"
    if exc.errno in _FULL + (errno.EIO,):
        return StorageError(exc.errno, f"{where}: {exc.strerror}: free some space (or keep fewer checkpoints), "
                                       "or check the disk, then start again")
    if exc.errno == errno.EROFS:
        return StorageError(exc.errno, f"{where}: the filesystem became read-only (an error on the disk? see "
                                       "dmesg): fix and remount it, then start again")
    if exc.errno in _READ_ONLY:
        return ConfigError(f"{where}: {exc.strerror}; fix the run folder's owner or mode")
    return ConfigError(f"cannot use {where}: {exc.strerror or exc}; savegame keeps only its own files there: "
                       "move whatever is in the way, then start again")


def open_mirror(config: RunConfig, run_dir: str) -> CheckpointStore:
    """The mirror's store. Its reachability is the start-up's business (with a deadline)."""
    remote = CheckpointStore(config["mirror"], config["storage"])
    if remote.is_local and _same_or_inside(remote.location.path, run_dir):
        raise ConfigError(f"mirror = {remote.url!r} is the run folder itself (or inside it); give another "
                          "disk or a bucket")
    return remote


def _same_or_inside(mirror: str, run_dir: str) -> bool:
    mirror, run_dir = os.path.realpath(mirror), os.path.realpath(run_dir)
    if mirror == run_dir or mirror.startswith(run_dir.rstrip(os.sep) + os.sep):
        return True
    try:
        return os.path.samefile(mirror, run_dir)
    except OSError:
        return False


class RunLock:
    """One writer per run folder; held by the daemon and inherited by its workers."""

    def __init__(self, run_dir: str, wait_for_orphans_s: float, name: str = LOCK_FILE) -> None:
        path = os.path.join(run_dir, STATUS_DIR, name)
        self.name = name
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise folder_error(run_dir, exc) from None
        self.run_dir = run_dir
        if not self._try():
            self._wait_for_orphans(wait_for_orphans_s)
        self.record(worker=None)

    def record(self, worker: Optional[int]) -> None:
        """Who holds the lock: this daemon, and its worker's process group."""
        data = json.dumps({"daemon": os.getpid(), "worker": worker}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def _try(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _holder(self) -> dict[str, Any]:
        raw = os.pread(self.fd, 256, 0)
        try:
            holder = load_json(raw, what="the lock file", max_bytes=256, max_depth=2)
        except MalformedInput:
            holder = raw.decode(errors="replace").strip()  # an older savegame wrote just its pid
        if isinstance(holder, str) and holder.isdigit():
            holder = {"daemon": int(holder)}
        return holder if isinstance(holder, dict) else {}

    def _wait_for_orphans(self, seconds: float) -> None:
        holder = self._holder()
        daemon, worker, writer = _pid(holder.get("daemon")), _pid(holder.get("worker")), _pid(holder.get("writer"))
        if writer is not None and process_alive(writer):
            os.close(self.fd)
            raise ConfigError(f"a training script run on its own (pid {writer}) is writing to {self.run_dir}; stop "
                              "it first (Ctrl-C saves its state), then run it under `savegame run`")
        if daemon is not None and daemon != os.getpid() and process_alive(daemon):
            os.close(self.fd)
            raise ConfigError(f"another `savegame run` (pid {daemon}) already supervises {self.run_dir}; "
                              "stop it first, or use another --dir")
        log.warning("the workers of a daemon that is gone (pid %s) still hold %s: waiting up to %gs for them to "
                    "commit their emergency checkpoint and exit", daemon or "?", self.run_dir, seconds)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._try():
                return
            time.sleep(ORPHAN_POLL_S)
        if worker is not None:
            log.warning("killing the leftover worker process group %d", worker)
            try:
                os.killpg(worker, signal.SIGKILL)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self._try():
                return
            time.sleep(ORPHAN_POLL_S)
        os.close(self.fd)
        raise ConfigError(f"{self.run_dir} is still held by processes of an earlier run; find them with "
                          f"`fuser {os.path.join(self.run_dir, STATUS_DIR, self.name)}` and stop them")


def _pid(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 22 else None


RUN_ID_FILE = "run_id"


def run_id_of(run_dir: str) -> str:
    """One id per run folder, kept across daemon restarts (a reboot continues the same run)."""
    path = os.path.join(run_dir, STATUS_DIR, RUN_ID_FILE)
    try:
        run_id = read_regular_file(path, 64).decode("ascii", errors="replace").strip()
        if run_id.isalnum() and len(run_id) <= 32:
            return run_id
        log.warning("ignoring a malformed run id in %s", path)
    except FileNotFoundError:
        pass
    except (OSError, MalformedInput) as exc:
        log.warning("cannot read the run id (%s); starting a new one", exc)
    run_id = uuid.uuid4().hex[:12]
    replace_file(path, run_id.encode())
    return run_id


def lock_for_standalone_writer(run_dir: str) -> int:
    """A training script run on its own holds the run folder's lock too, so that `savegame run` (or a
    second script) does not start a second writer on it. The descriptor; ConfigError when it is taken."""
    folder = os.path.join(run_dir, STATUS_DIR)
    os.makedirs(folder, mode=0o750, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 256, 0).decode(errors="replace")
        os.close(fd)
        raise ConfigError(f"{run_dir} is in use by another savegame process ({holder.strip() or '?'}): one writer "
                          "per run folder; stop it, or give this script another folder") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"writer": os.getpid()}).encode(), 0)
    return fd
