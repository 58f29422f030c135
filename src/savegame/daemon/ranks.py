"""The ranks of a torch.distributed job on this node, as the daemon hears of them.

torchrun starts one process per rank (in sessions of their own) and turns any rank's exit into its
own exit 1, so the daemon learns what the ranks did from their events: each announces itself
(`hello`: pid, rank, world size, local rank), beats, and says why it stops (`stopping`: "requested"
when it was asked, "agreed" when another rank of the job asked) or which exit code it means
(`exiting`, `bad-checkpoint`). From that the daemon tells a job that stopped on purpose (exit 75)
from one that crashed, and shows each local rank's heartbeat. One process (world size 1) is left
exactly as before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from savegame import protocol

# The codes a rank may report, in the order one wins over another when ranks disagree.
REPORTED_CODES = (protocol.EXIT_CONFIG, protocol.EXIT_BAD_CHECKPOINT, protocol.EXIT_IO)


@dataclass
class Rank:
    pid: int
    rank: int
    world_size: int
    local_rank: int
    step: Optional[int] = None
    time: Optional[float] = None  # wall time of its last event
    stopping: Optional[str] = None  # why it stopped after its emergency checkpoint: requested, agreed


def _int(event: Mapping[str, Any], key: str, default: int) -> int:
    value = event.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 24 else default


class RankTable:
    def __init__(self) -> None:
        self.ranks: dict[int, Rank] = {}  # by pid
        self.reports: dict[int, int] = {}  # pid -> the exit code it reported (also before its hello)

    def reset(self) -> None:
        self.ranks, self.reports = {}, {}

    def senders(self) -> set[int]:
        """Every process heard of: a launcher's exit is told apart by not being one of them."""
        return set(self.ranks) | set(self.reports)

    @property
    def world_size(self) -> int:
        return max((r.world_size for r in self.ranks.values()), default=1)

    @property
    def multi_rank(self) -> bool:
        return self.world_size > 1

    @property
    def hosts_rank0(self) -> bool:
        return any(r.rank == 0 for r in self.ranks.values())

    def hello(self, event: Mapping[str, Any]) -> Rank:
        pid = int(event["pid"])
        rank = _int(event, "rank", 0)
        entry = Rank(pid, rank, max(_int(event, "world_size", 1), 1), _int(event, "local_rank", rank))
        self.ranks[pid] = entry
        return entry

    def note(self, event: Mapping[str, Any], now: Optional[float] = None) -> None:
        """Any event from a rank: its step and when it was last heard of, why it stops or exits."""
        pid, kind = int(event["pid"]), event.get("event")
        if kind == "bad-checkpoint":
            self.reports[pid] = protocol.EXIT_BAD_CHECKPOINT
        elif kind == "exiting" and event.get("code") in REPORTED_CODES:
            self.reports[pid] = int(event["code"])
        entry = self.ranks.get(pid)
        if entry is None:
            return
        entry.time = time.time() if now is None else now
        step = event.get("step")
        if isinstance(step, int) and not isinstance(step, bool):
            entry.step = step
        if kind == "stopping":
            entry.stopping = "agreed" if event.get("why") == "agreed" else "requested"

    def stopped_together(self) -> Optional[str]:
        """When every rank here stopped after its emergency checkpoint: "agreed" if none of them was
        asked (another node's rank was), else "requested". None otherwise."""
        if not self.ranks or any(r.stopping is None for r in self.ranks.values()):
            return None
        return "agreed" if all(r.stopping == "agreed" for r in self.ranks.values()) else "requested"

    def reported_exit(self) -> Optional[int]:
        codes = set(self.reports.values())
        return next((code for code in REPORTED_CODES if code in codes), None)

    def translate(self, code: Optional[int], launcher: bool) -> tuple[Optional[int], str]:
        """(the exit code the job meant, a note) for the exit `code` of a `launcher` that is not itself
        a rank (torchrun exits 1 for any failing rank); the code unchanged, with no note, for the
        training process itself or a code of savegame's own."""
        if not launcher or code in (protocol.EXIT_OK, protocol.EXIT_SAVED_RESUME_ME, *REPORTED_CODES):
            return code, ""
        together = self.stopped_together()
        if together is not None:
            why = ("the job agreed to stop: another node asked for an emergency checkpoint" if together == "agreed"
                   else "the ranks were asked to stop")
            return protocol.EXIT_SAVED_RESUME_ME, f"every rank here committed the emergency checkpoint and exited 75; {why}"
        reported = self.reported_exit()
        if reported is not None:
            return reported, f"a rank reported exit code {reported}"
        return code, ""

    def summary(self) -> Optional[dict[str, Any]]:
        """For status.json: the world size and this node's ranks (None for one process)."""
        if not self.multi_rank:
            return None
        ranks = sorted(self.ranks.values(), key=lambda r: r.local_rank)
        return {"world_size": self.world_size, "hosts_rank0": self.hosts_rank0,
                "ranks": [{"rank": r.rank, "local_rank": r.local_rank, "pid": r.pid, "step": r.step,
                           "time": r.time, "stopping": r.stopping} for r in ranks]}


def format_ranks(status: Mapping[str, Any], now: float) -> list[str]:
    """`savegame status` lines for a job's ranks (none for one process)."""
    job = status.get("job")
    node = status.get("node")
    lines = [f"node:            {node}" + (" (leader: retention and mirror)" if status.get("leader") else "")
             ] if isinstance(node, str) else []
    if not isinstance(job, dict) or not isinstance(job.get("ranks"), list):
        return lines
    lines += [f"job:             world size {job.get('world_size', '?')}, {len(job['ranks'])} rank(s) on this node"
             + (" (incl. rank 0)" if job.get("hosts_rank0") else "")]
    for r in job["ranks"]:
        if not isinstance(r, dict):
            continue
        seen = r.get("time")
        age = f"{max(now - seen, 0):.1f}s ago" if isinstance(seen, (int, float)) and not isinstance(seen, bool) else "-"
        state = f", stopped ({r.get('stopping')})" if r.get("stopping") else ""
        lines.append(f"  local rank {r.get('local_rank')}: rank {r.get('rank')}, pid {r.get('pid')}, "
                     f"step {r.get('step', '-')}, last heard {age}{state}")
    return lines
