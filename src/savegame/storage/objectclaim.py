"""Claims on object stores: the one writer of a step, decided before any payload byte is written.

A writer creates ckpt-*/.savegame-writer.json (host, pid, time) create-only. A second writer of the
step finds it and gets CheckpointExists, unless the claim's writer is known to be gone: on this
host a dead pid, or this very process with no save of that step in progress. Another host's claim
holds the step until the leftover is collected as stale.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Optional

from savegame.errors import CheckpointExists, MalformedInput
from savegame.storage.manifest import CLAIM_NAME, utc_now_iso
from savegame.storage.pids import parse_pid, process_alive
from savegame.untrusted import field, integer, load_json, obj, text

if TYPE_CHECKING:
    from savegame.storage.objectstore import ObjectBackend

_ACTIVE: set[str] = set()  # claims held by staged checkpoints of this process
_LOCK = threading.Lock()


def take_claim(backend: "ObjectBackend", name: str) -> str:
    """Claim step folder `name` for this writer; returns the claim's path."""
    rel = f"{name}/{CLAIM_NAME}"
    mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
                       "started": utc_now_iso()}).encode()
    try:
        backend.put_create_only(rel, mine)
    except CheckpointExists:
        holder = _holder(backend, rel)
        if holder is not None:
            raise CheckpointExists(errno.EEXIST, f"{backend.location.url}/{name}: another writer is saving this "
                                                 f"step ({holder}); if it died, its leftovers are collected "
                                                 "once stale (stale_after)") from None
        backend.fs.rm_file(backend.full(rel))  # its writer is gone: take the step over, once
        backend.put_create_only(rel, mine)
    claim = backend.full(rel)
    with _LOCK:
        _ACTIVE.add(claim)
    return claim


def release_claim(claim: str) -> None:
    """This process no longer writes under `claim` (the object itself is removed by the caller)."""
    with _LOCK:
        _ACTIVE.discard(claim)


def _holder(backend: "ObjectBackend", rel: str) -> Optional[str]:
    """Who holds a claim, or None when its writer is known to be gone."""
    try:
        data = obj(load_json(backend.fs.cat_file(backend.full(rel)), what=rel, max_bytes=4096), rel)
        host = field(data, "host", text(256), rel)
        pid = parse_pid(str(field(data, "pid", integer(0, 2**63), rel)))
    except FileNotFoundError:
        return None  # released meanwhile
    except MalformedInput:
        return "a writer whose claim savegame cannot read"
    if host != socket.gethostname() or pid is None:
        return f"{host}, pid {pid}"
    with _LOCK:
        active = backend.full(rel) in _ACTIVE
    if (pid == os.getpid() and not active) or (pid != os.getpid() and not process_alive(pid)):
        return None
    return f"this host, pid {pid}"
