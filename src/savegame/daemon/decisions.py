"""The supervisor's decisions beyond stop and restart: cloud notices that ask for a checkpoint, the
scheduler's preemption signal (SLURM: requeue), Azure approvals, NaN/spike rollbacks, and the run's
failure record that the adaptive save interval is computed from.

Stop and restart decisions stay in `machine.py`; this module turns inputs into its events and
performs the actions it returns (RollBack, Requeue), and does what must wait until the emergency
checkpoint is safe (approving an Azure event).
"""
from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Optional

from savegame import protocol
from savegame.anomalies import read_anomalies
from savegame.daemon import machine as m
from savegame.daemon.deadline import with_deadline
from savegame.daemon.notices import Notice
from savegame.daemon.reliability import ReliabilityRecord
from savegame.daemon.resume import QUICK_LIST_S
from savegame.daemon.slurm import requeue
from savegame.errors import MalformedInput, StorageError

if TYPE_CHECKING:
    from savegame.daemon.supervisor import Supervisor

log = logging.getLogger("savegame")


class Decisions:
    def __init__(self, daemon: "Supervisor") -> None:
        self.daemon = daemon
        name = daemon.settings["preemption_signal"]
        self.preemption_signal: Optional[int] = getattr(signal, name) if name else None
        self.reliability = ReliabilityRecord(daemon.run_dir)
        self.rollback_before: Optional[int] = None  # the next start resumes from before this step
        self._approvals: list[Notice] = []

    # -- inputs -> events -------------------------------------------------------------------------

    def signals(self) -> tuple[int, ...]:
        """Signals the daemon takes besides the stop signals and SIGUSR1."""
        return (self.preemption_signal,) if self.preemption_signal not in (None, signal.SIGUSR1) else ()

    def on_signal(self, signum: int) -> Optional[m.Event]:
        """The scheduler's preemption signal as a stop that requeues; None for any other signal."""
        if signum != self.preemption_signal:
            return None
        name = signal.Signals(signum).name
        if not self.daemon.machine.stopping:
            self.reliability.preempted()
        return m.StopRequested(f"{name} (the preemption signal)", requeue=True)

    def on_notice(self, notice: Notice) -> m.Event:
        if notice.action == "checkpoint":
            log.info("%s", notice.what)
            return m.CheckpointRequested()
        if notice.ack is not None:
            self._approvals.append(notice)
        if not self.daemon.machine.stopping:
            self.reliability.preempted()
        return m.StopRequested(notice.what)

    def worker_exited(self, code: Optional[int], last_step: Optional[int]) -> dict:
        """What WorkerExited needs beyond the exit status: for exit 76, the anomaly's step and count."""
        if code != protocol.EXIT_ROLLBACK:
            return {}
        try:
            entries = read_anomalies(self.daemon.run_dir)
        except (OSError, MalformedInput) as exc:
            log.warning("cannot read the run's anomaly record (%s); judging by the worker's last step", exc)
            entries = []
        if not entries:
            return {"anomaly_step": None, "anomalies": 0}
        return {"anomaly_step": entries[-1].step, "anomalies": len(entries)}

    # -- bookkeeping around workers ---------------------------------------------------------------

    def worker_env(self, env: dict[str, str]) -> dict[str, str]:
        self.reliability.started()
        return {**env, protocol.ENV_RELIABILITY: self.reliability.for_worker()}

    def transitioned(self, event: m.Event, before: m.Machine, after: m.Machine) -> None:
        if isinstance(event, m.WorkerExited):
            new = after.failures[len(before.failures):]
            self.reliability.ended(new[-1].cause if new else None)

    # -- actions ----------------------------------------------------------------------------------

    def roll_back(self, before: int) -> None:
        """Set aside (quarantine, never delete) every checkpoint at or after `before`, on both tiers,
        and have the next start resume from the newest one before it."""
        d = self.daemon
        self.rollback_before = before
        why = f"saved at or after step {before}, where the loss went bad"
        for store in (d.local, d.remote):
            if store is None:
                continue
            bounded = (lambda call, what: call()) if store.is_local else \
                (lambda call, what: with_deadline(call, QUICK_LIST_S, what))  # a slow bucket must not hold the loop
            try:
                for info in [c for c in bounded(store.list, f"listing {store.url}") if c.step >= before]:
                    d.set_aside.add(info.step)
                    bounded(lambda: store.quarantine(info.step, why), f"quarantining step {info.step}")
                    log.warning("quarantined step %d in %s: %s", info.step, store.url, why)
            except StorageError as exc:
                log.error("cannot set aside the checkpoints from step %d on in %s: %s", before, store.url, exc)

    def approve(self) -> None:
        """Once the mirror is flushed: approve the Azure events that stopped the run, when the
        emergency checkpoint is safe (committed, and in the mirror when there is one)."""
        d = self.daemon
        safe = d._emergency_step is not None and d._emergency_step not in d.mirror_missing  # noqa: SLF001
        for notice in self._approvals:
            if not safe:
                log.warning("not approving the scheduled event: no emergency checkpoint is safe; the platform "
                            "proceeds at its deadline")
            elif d.preemption is not None and d.preemption.acknowledge(notice):
                log.info("approved the scheduled event (%s): the platform may proceed now", notice.what)
        self._approvals.clear()

    def requeue(self, code: int) -> int:
        """SLURM: requeue the job; the exit code, 75 when it stopped cleanly but could not be requeued."""
        if requeue() is False and code == protocol.EXIT_OK:
            return protocol.EXIT_SAVED_RESUME_ME  # saved, but nobody will start it again: say so
        return code
