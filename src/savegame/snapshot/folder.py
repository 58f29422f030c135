"""The run's segment folder in /dev/shm: made by the daemon (0700), emptied when a worker dies, at the
next daemon start (what a SIGKILLed daemon left) and removed when the run ends.

One folder per run folder and user (named from a hash of the run folder's path), so the next
daemon of the same run finds what the last one left. A folder that is not ours (a symlink, another
owner, other permissions) is never used: the hand-over is off and workers save in-process.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import stat
from typing import Optional

from savegame.snapshot.layout import SEGMENT_NAME

log = logging.getLogger("savegame")
SHM_ROOT = "/dev/shm"


def folder_for(run_dir: str, root: str = SHM_ROOT, node: str = "") -> str:
    key = hashlib.sha256(f"{os.path.realpath(run_dir)}\0{node}".encode()).hexdigest()[:16]
    return os.path.join(root, f"savegame-{os.getuid()}-{key}")


def prepare_folder(run_dir: str, root: str = SHM_ROOT, node: str = "") -> Optional[str]:
    """The run's segment folder, private (what a previous daemon left stays for the caller to
    salvage and clear); None when shared memory is not usable here."""
    if not os.path.isdir(root):
        return None
    path = folder_for(run_dir, root, node)
    try:
        if os.path.lexists(path):
            if not _ours(path):
                log.warning("%s is not a private folder of this user: saving without the shared-memory tier", path)
                return None
        else:
            os.mkdir(path, 0o700)
        os.chmod(path, 0o700)
    except OSError as exc:
        log.warning("cannot prepare %s (%s): saving without the shared-memory tier", path, exc)
        return None
    return path


def clear(path: str, pid: Optional[int] = None, keep: Optional[str] = None) -> int:
    """Remove the segments in `path` (those of process `pid` only, when given), all but the file
    `keep`; how many went."""
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path):
            match = SEGMENT_NAME.match(name)
            if pid is not None and (match is None or int(match.group(1)) != pid):
                continue
            if keep is not None and os.path.join(path, name) == keep:
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
                removed += 1
    return removed


def remove(path: str) -> None:
    if _ours(path):
        shutil.rmtree(path, ignore_errors=True)


def _ours(path: str) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid() and stat.S_IMODE(info.st_mode) & 0o077 == 0
