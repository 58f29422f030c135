"""Rolling back after a bad loss (NaN, inf, a spike), from the worker's side.

The rollback is a restart: the worker records the anomaly in the run folder and exits 76; the
daemon sets aside the checkpoints from the anomaly's step on and starts a new worker from the newest
one before it, which skips the offending batch when `skip_batches` is on. Why not reload in place:
a restart goes through the same verified, exact resume path as every other one, resets everything
the bad step touched (optimizer moments, GPU state, RNGs, DataLoader workers, the framework's own
loop: Keras' fit, Lightning's and Hugging Face's trainers cannot be rewound from outside), and costs
one process start, for an event that happens at most `rollback.max` times. On its own (no daemon) the
worker sets those checkpoints aside itself and asks to be run again.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, NoReturn

from savegame import protocol
from savegame.anomalies import add_anomaly, read_anomalies, skipped_batches
from savegame.errors import MalformedInput, StorageError
from savegame.worker.exits import say

if TYPE_CHECKING:
    from savegame.worker.checkpointer import Checkpointer
    from savegame.worker.guard import Pending

log = logging.getLogger("savegame.worker")


def batches_to_skip(run_dir: str) -> frozenset[tuple[int, int]]:
    """The (epoch, batch) positions earlier rollbacks asked every start to step over."""
    try:
        return skipped_batches(read_anomalies(run_dir))
    except (OSError, MalformedInput) as exc:
        log.warning("cannot read the run's anomaly record (%s): no batches are skipped", exc)
        return frozenset()


def roll_back(ckpt: "Checkpointer", pending: "Pending") -> NoReturn:
    """Record the anomaly, set its checkpoints aside (on its own), say what happens, exit 76."""
    rule = ckpt.config.rollback_rule()
    ckpt.close()  # the save in flight (of an earlier step) finishes; nothing is saved from here on
    try:
        count = add_anomaly(os.path.abspath(ckpt.dir), pending.entry(rule.skip_batches))
    except OSError as exc:
        log.error("cannot record the anomaly in the run folder: %s", exc)
        count = 0
    where = f"batch {pending.batch} of epoch {pending.epoch}"
    say(f"the loss went bad at step {pending.step} ({where}): {pending.anomaly.why}; "
        + (f"rolling back to a checkpoint before step {pending.step}"
           + (f", then skipping {where}" if rule.skip_batches else "") if count <= rule.max else
           f"giving up: it went bad {count} times (rollback.max = {rule.max})"))
    if not ckpt.supervised:
        _set_aside(ckpt, pending.step)
        if count <= rule.max:
            say("run it again to resume from before it")
    raise SystemExit(protocol.EXIT_ROLLBACK)


def _set_aside(ckpt: "Checkpointer", step: int) -> None:
    """On its own: quarantine (never delete) the checkpoints from `step` on, so the next start resumes before it."""
    why = f"saved at or after step {step}, where the loss went bad"
    try:
        for info in [c for c in ckpt.store.list() if c.step >= step]:
            ckpt.store.quarantine(info.step, why)
            say(f"set aside step {info.step} ({why})")
    except StorageError as exc:
        log.error("cannot set aside the checkpoints from step %d on: %s", step, exc)
