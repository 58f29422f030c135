"""Several nodes of one job on a shared run folder: one daemon per node (`--nodes N`).

Each node's daemon keeps its own files in `.savegame/` -- its lock (`daemon.<node>.lock`), status
(`status.<node>.json`), the worker's output and progress cell, its settings -- so daemons of one run
never take each other for a second writer. The checkpoints are the job's: one leader runs
retention and the mirror (the node given `--leader`, else the first one whose ranks include global
rank 0, known from their hellos); the others only supervise their node's ranks. One node (the
default) keeps every file name as it always was.
"""
from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional

from savegame.config import NODE_NAME
from savegame.daemon.rundir import LOCK_FILE
from savegame.daemon.status import STATUS_DIR
from savegame.errors import ConfigError


@dataclass(frozen=True)
class Node:
    name: Optional[str] = None  # None: the only node
    pinned_leader: bool = False  # `--leader`: this node leads whatever the ranks say

    def file(self, base: str) -> str:
        """This node's name for one of the daemon's files: status.json -> status.<node>.json."""
        if self.name is None:
            return base
        stem, dot, ext = base.partition(".")
        return f"{stem}.{self.name}{dot}{ext}"


def node_of(settings: Any) -> Node:
    """The node this daemon runs for, from `nodes`, `node` and `leader` (one node unless nodes > 1)."""
    nodes = settings["nodes"] or 1
    if nodes == 1:
        if settings["node"] or settings["leader"]:
            raise ConfigError("--node and --leader are for a job on several nodes: give --nodes N as well")
        return Node()
    name = settings["node"] or socket.gethostname().split(".")[0]
    if not NODE_NAME.fullmatch(name):
        raise ConfigError(f"node name {name[:80]!r}: give --node NAME (letters, digits, '-' and '_', at most 64)")
    return Node(name, bool(settings["leader"]))


class NodesLock:
    """A shared hold on the run folder's `daemon.lock`, taken by every node's daemon (and inherited by
    its ranks): the daemons of one job's nodes share the folder, a single-node daemon (which takes
    the lock exclusively) cannot run beside them, nor they beside it."""

    def __init__(self, run_dir: str) -> None:
        path = os.path.join(run_dir, STATUS_DIR, LOCK_FILE)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConfigError(f"a single-node `savegame run` supervises {run_dir}; stop it before starting the "
                              "daemons of a job on several nodes (--nodes) there") from None
