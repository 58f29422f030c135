"""The ranks of one torch.distributed job: who this process is, and the decisions all ranks share.

Every rank must stop, and save, at the same step: a sharded checkpoint needs every rank's part of
one state. Deterministic schedules (every n steps or epochs) give the same answer everywhere; what
one rank alone sees (its SIGTERM, a SIGUSR1, a clock, its metrics) is agreed on: at each step
boundary every rank puts its flags into one small all_reduce(MAX), launched without waiting and
waited for at the next boundary, so the agreement overlaps a step of compute and costs one step
of latency. An epoch end (rare, and where "best" is decided) agrees at once.

Checkpoint traffic runs on gloo groups of its own: the agreement on one (training thread), the
background writer's collectives on another, so they never interleave with each other or with the
training's own collectives (NCCL on GPUs stays untouched).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from savegame.errors import ConfigError
from savegame.protocol import EXIT_FAILED
from savegame.strategies import AnySchedule, EveryNEpochs, EveryNSteps, History, Moment
from savegame.worker.exits import say

log = logging.getLogger("savegame.worker")
GROUP_TIMEOUT = timedelta(minutes=30)  # gloo's default; a dead peer is noticed at once (its socket closes)
STOP, MANUAL, DUE = 0, 1, 2  # the flags every rank contributes
DUE_CODES = {None: 0, "periodic": 1, "best": 2}
REASONS = {code: reason for reason, code in DUE_CODES.items()}


@dataclass(frozen=True)
class Job:
    """This process's place in the job, and the gloo groups checkpointing uses (None: one rank)."""

    rank: int
    world_size: int
    local_rank: int
    agree_group: Optional[Any] = None  # the training thread's agreement
    save_group: Optional[Any] = None  # the writer thread's collectives

    @property
    def coordinator(self) -> bool:
        return self.rank == 0

    def leave(self) -> None:
        """At a point every rank reaches (the final or emergency commit): wait for the others, then
        let the checkpoint groups go, so none of their traffic is left for the script's own teardown
        (gloo, torn down while a peer still talks on a group, may abort the process)."""
        if self.save_group is None:
            return
        try:
            dist.barrier(group=self.save_group)
            for group in (self.agree_group, self.save_group):
                dist.destroy_process_group(group)
        except (RuntimeError, ValueError) as exc:  # a rank already gone, or the script tore them down
            log.debug("leaving the checkpoint groups: %s", exc)


def distributed() -> bool:
    """Whether this process is one rank of an initialized torch.distributed job."""
    return dist.is_available() and dist.is_initialized()


def check_initialized() -> None:
    """torchrun started this process as a rank, but the script has not joined the job yet."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not distributed() and world.isdigit() and int(world) > 1:
        raise ConfigError(f"this process is one of {world} ranks (WORLD_SIZE={world}), but torch.distributed is not "
                          "initialized: call torch.distributed.init_process_group() before ckpt.track()")


def join_job() -> Job:
    """This rank's Job, with its two checkpoint groups (every rank calls this, in the same order)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world == 1:
        return Job(rank, world, local_rank)
    agree = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    save = dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    return Job(rank, world, local_rank, agree, save)


def split_schedule(schedule: Any) -> tuple[list[Any], list[Any]]:
    """(parts every rank computes alike, parts rank 0 decides): steps and epochs are deterministic;
    anything else (a clock, a metric, a schedule unknown here) is rank 0's call."""
    parts = list(schedule.parts) if isinstance(schedule, AnySchedule) else [schedule]
    same = [p for p in parts if isinstance(p, (EveryNSteps, EveryNEpochs))]
    return same, [p for p in parts if p not in same]


class Agreement:
    """Stop and save decisions taken at the same step on every rank.

    Per step boundary the training thread waits for the flags sent at the previous one (normally long
    arrived: the all_reduce ran during the step) and sends its own; two small tensors take turns,
    so nothing is allocated per step."""

    def __init__(self, job: Job, schedule: Any) -> None:
        self.job = job
        same, rank0 = split_schedule(schedule)
        self._same = AnySchedule(tuple(same))
        self._rank0 = AnySchedule(tuple(rank0)) if rank0 and job.coordinator else None
        self._buffers = (torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64))
        self._turn = 0
        self._pending: Optional[Any] = None  # the all_reduce in flight (on the buffer of this turn)
        self._intent = [0, 0, 0]  # what this rank contributes next

    def decide(self, moment: Moment, history: History, stop: bool, manual: bool) -> tuple[bool, Optional[str]]:
        """(stop, reason to save) at this boundary, the same on every rank. `stop`/`manual` are this
        rank's own requests; they count at the next step boundary (now, at an epoch end)."""
        agreed = self._collect()
        due = self._rank0.due(moment, history) if self._rank0 is not None else None
        self._intent = [int(stop), int(manual), DUE_CODES.get(due, 1)]
        if moment.at_epoch_end or self.job.agree_group is None:  # an epoch end is rare, and "best" must
            agreed = [max(a, b) for a, b in zip(agreed, self._reduce(self._intent))]  # go with its metrics
            self._intent = [0, 0, 0]
        reason = "manual" if agreed[MANUAL] else None
        reason = reason or _better(self._same.due(moment, history), REASONS.get(agreed[DUE]))
        return bool(agreed[STOP]), reason

    def launch(self, saved: bool) -> None:
        """After this step boundary's save (if any): send this rank's flags on their way. A schedule
        rank 0 found due is dropped when this boundary saved anyway."""
        if self.job.agree_group is None:
            return  # one rank: decided at once
        self._turn ^= 1
        flags = self._buffers[self._turn]
        flags[STOP], flags[MANUAL], flags[DUE] = self._intent[STOP], self._intent[MANUAL], 0 if saved else self._intent[DUE]
        self._pending = dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.job.agree_group, async_op=True)

    def drain(self) -> None:
        """Wait for the agreement in flight (before the final save, or leaving)."""
        self._collect()

    def _collect(self) -> list[int]:
        work, self._pending = self._pending, None
        if work is None:
            return [0, 0, 0]
        _wait(work)
        return self._buffers[self._turn].tolist()

    def _reduce(self, intent: list[int]) -> list[int]:
        if self.job.agree_group is None:
            return list(intent)
        flags = torch.tensor(intent, dtype=torch.int64)
        _wait(dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.job.agree_group, async_op=True))
        return flags.tolist()


def _better(a: Optional[str], b: Optional[str]) -> Optional[str]:
    return "best" if "best" in (a, b) else (a or b)


def _wait(work: Any) -> None:
    """Another rank gone (killed, OOM) leaves nothing to agree with: say so in one line and leave
    (torchrun ends the job; the daemon restarts it from the last checkpoint)."""
    try:
        work.wait()
    except RuntimeError as exc:  # gloo: "Connection closed by peer", a timeout
        say(f"another rank of the job is gone ({str(exc).splitlines()[0][:200]}); a sharded checkpoint needs every "
            "rank, so none is saved now: the job restarts from the last committed one")
        raise SystemExit(EXIT_FAILED) from None
