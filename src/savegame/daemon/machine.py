"""The supervisor's state machine: one enum, one pure transition function.

`transition(machine, event, now, policy)` returns the next machine, the actions to perform and the
reason, and nothing else changes state. The supervisor performs the actions (I/O) and logs every
transition with its reason, so the whole life of a run can be read from the log.

    STARTING -> RUNNING -> SUCCEEDED                 the worker finished (exit 0)
                RUNNING -> BACKOFF -> STARTING       it died: restart (after a backoff)
                RUNNING -> FAILED                    restart budget spent, or a config error
                RUNNING -> DRAINING -> STOPPED       stop request: emergency checkpoint, exit 75
                DRAINING -> KILLING -> STOPPED       the grace period ran out
                RUNNING -> KILLING -> BACKOFF        a hang: stacks dumped, group killed
                RUNNING -> BACKOFF -> STARTING       the loss went bad (exit 76): roll back, at once
                any     -> FAILED                    aborted: the daemon itself cannot go on
"""
from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field, replace
from typing import Optional, Union

from savegame import protocol
from savegame.strategies.restart import Failure, RestartPolicy, decide


class State(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    KILLING = "killing"
    BACKOFF = "backoff"
    SUCCEEDED = "succeeded"
    STOPPED = "stopped"
    FAILED = "failed"


TERMINAL = (State.SUCCEEDED, State.STOPPED, State.FAILED)


# -- events ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spawned:
    pid: int


@dataclass(frozen=True)
class SpawnFailed:
    error: str
    config_error: bool  # the command cannot run at all (first start only): not worth retrying


@dataclass(frozen=True)
class WorkerExited:
    code: Optional[int]  # exit status, or None when killed by a signal
    signal: Optional[int]
    last_step: Optional[int]  # the step it had reached (exact: the worker writes it at every boundary)
    loaded_step: Optional[int] = None  # the checkpoint it said it had loaded, if any
    emergency_saved: bool = False  # it reported an emergency commit (a wrapper may lose exit code 75)
    note: str = ""  # how `code` was told when the process itself exited otherwise (torchrun: from its ranks)
    trained: bool = True  # it had announced itself (started training): a stop without its checkpoint loses work
    anomaly_step: Optional[int] = None  # exit 76: checkpoints at or after this step hold a bad state
    anomalies: int = 0  # exit 76: how many times the run's loss went bad so far, this one included
    finished: bool = False  # it reported the end of training (finish(): its final checkpoint committed)

    @property
    def suspect_step(self) -> Optional[int]:
        """The checkpoint this death may be about: it died right after loading it, before any step.
        A death before loading (a missing dataset, an import error) or after progress is about the
        environment or the code, never held against a verified checkpoint."""
        if self.loaded_step is not None and self.last_step in (None, self.loaded_step):
            return self.loaded_step
        return None


@dataclass(frozen=True)
class StopRequested:
    signal_name: str
    requeue: bool = False  # a scheduler's preemption signal (SLURM): requeue the job once stopped


@dataclass(frozen=True)
class CheckpointRequested:
    pass


@dataclass(frozen=True)
class GraceExpired:
    pass


@dataclass(frozen=True)
class HangDetected:
    silent_s: float


@dataclass(frozen=True)
class DumpWaitOver:
    pass


@dataclass(frozen=True)
class BackoffOver:
    pass


@dataclass(frozen=True)
class Aborted:
    reason: str  # the daemon cannot go on (a configuration error found at start-up, a full disk, a bug)
    exit_code: int = protocol.EXIT_FAILED


Event = Union[Spawned, SpawnFailed, WorkerExited, StopRequested, CheckpointRequested, GraceExpired,
              HangDetected, DumpWaitOver, BackoffOver, Aborted]


# -- actions --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StartWorker:
    fallback: bool  # the last resume source was set aside: this start falls back one checkpoint


@dataclass(frozen=True)
class SignalWorker:
    signal: int  # to the worker's main process only (its DataLoader children must finish the step)


@dataclass(frozen=True)
class KillGroup:
    pass


@dataclass(frozen=True)
class SetTimer:
    name: str  # "grace", "dump", "backoff"
    seconds: float


@dataclass(frozen=True)
class QuarantineResume:
    pass  # the worker could not load its checkpoint: damaged, moved aside


@dataclass(frozen=True)
class SetAsideResume:
    pass  # the worker died right after loading it, again and again: not used again by this daemon


@dataclass(frozen=True)
class RollBack:
    before_step: int  # set aside the checkpoints at or after it; the next start resumes from before it


@dataclass(frozen=True)
class Finish:
    exit_code: int


@dataclass(frozen=True)
class Requeue:
    pass  # after Finish (the mirror holds the emergency checkpoint): `scontrol requeue` the job


Action = Union[StartWorker, SignalWorker, KillGroup, SetTimer, QuarantineResume, SetAsideResume, RollBack, Finish,
               Requeue]


@dataclass(frozen=True)
class Machine:
    state: State = State.STARTING
    stopping: bool = False  # a stop was requested: never restart again
    kill_cause: Optional[str] = None  # why KILLING: "grace" or "hang"
    failures: tuple[Failure, ...] = field(default_factory=tuple)
    fell_back: bool = False  # a fallback was used once: the next "stuck" gives up
    fallback_next: bool = False  # the next start resumes from the checkpoint before the last one
    requeue: bool = False  # the stop came from a scheduler's preemption signal: requeue once stopped
    grace_s: float = 25.0
    dump_wait_s: float = 2.0


@dataclass(frozen=True)
class Transition:
    machine: Machine
    actions: tuple[Action, ...]
    reason: str


def transition(m: Machine, event: Event, now: float, policy: RestartPolicy) -> Transition:
    """The one place state changes. Unexpected events leave the state as it is."""
    if m.state in TERMINAL:
        return Transition(m, (), f"{type(event).__name__} ignored: already {m.state.value}")
    if isinstance(event, Aborted):  # the worker was already asked for its emergency checkpoint
        return Transition(replace(m, state=State.FAILED), (KillGroup(), Finish(event.exit_code)), event.reason)
    if isinstance(event, StopRequested):
        return _on_stop(m, event)
    if isinstance(event, CheckpointRequested):
        if m.state == State.RUNNING:
            return Transition(m, (SignalWorker(signal.SIGUSR1),), "checkpoint requested: SIGUSR1 to the worker")
        return Transition(m, (), f"checkpoint request ignored while {m.state.value}")
    if isinstance(event, Spawned):
        return Transition(replace(m, state=State.RUNNING), (), f"worker started (pid {event.pid})")
    if isinstance(event, SpawnFailed):
        if event.config_error:
            return Transition(replace(m, state=State.FAILED), (Finish(protocol.EXIT_CONFIG),),
                              f"cannot start the worker: {event.error}")
        return _on_failure(m, "spawn", None, f"cannot start the worker ({event.error})", now, policy)
    if isinstance(event, WorkerExited):
        return _on_exit(m, event, now, policy)
    if isinstance(event, GraceExpired) and m.state == State.DRAINING:
        return Transition(replace(m, state=State.KILLING, kill_cause="grace"), (KillGroup(),),
                          f"the grace period ({m.grace_s:g}s) ran out: killing the worker's process group")
    if isinstance(event, HangDetected) and m.state == State.RUNNING:
        return Transition(replace(m, state=State.KILLING, kill_cause="hang"),
                          (SignalWorker(signal.SIGUSR2), SetTimer("dump", m.dump_wait_s)),
                          f"no heartbeat for {event.silent_s:.0f}s: dumping the worker's stacks, then killing it")
    if isinstance(event, DumpWaitOver) and m.state == State.KILLING:
        return Transition(m, (KillGroup(),), "stack dump time is over: killing the worker's process group")
    if isinstance(event, BackoffOver) and m.state == State.BACKOFF:
        return Transition(replace(m, state=State.STARTING, fallback_next=False),
                          (StartWorker(fallback=m.fallback_next),),
                          "backoff over: restarting the worker")
    return Transition(m, (), f"{type(event).__name__} ignored while {m.state.value}")


def _on_stop(m: Machine, event: StopRequested) -> Transition:
    if m.stopping:
        return Transition(m, (), f"{event.signal_name} again: already stopping, the emergency checkpoint "
                                 "is not cut short")
    stopping = replace(m, stopping=True, requeue=event.requeue)
    if m.state == State.RUNNING:
        return Transition(replace(stopping, state=State.DRAINING),
                          (SignalWorker(signal.SIGTERM), SetTimer("grace", m.grace_s)),
                          f"{event.signal_name}: asking the worker for an emergency checkpoint "
                          f"(grace {m.grace_s:g}s)")
    if m.state in (State.STARTING, State.BACKOFF):
        return Transition(replace(stopping, state=State.STOPPED), _finish(stopping, protocol.EXIT_OK),
                          f"{event.signal_name} while no worker runs: stopping")
    return Transition(stopping, (), f"{event.signal_name} while {m.state.value}: will stop once the worker is gone")


def _on_stopped(m: Machine, event: WorkerExited, how: str) -> Transition:
    """The end of a stop: exit 0 only when nothing was lost (the emergency checkpoint was committed,
    or the worker had not started training); 74 when work since the last checkpoint is gone."""
    saved = event.code == protocol.EXIT_SAVED_RESUME_ME or event.emergency_saved
    if saved:
        note, code = "emergency checkpoint committed", protocol.EXIT_OK
    elif not event.trained:
        note, code = "it had not started training: nothing to save", protocol.EXIT_OK
    elif event.code == protocol.EXIT_IO:
        note, code = "its emergency checkpoint could not be committed (a full disk?): the last one stands", \
            protocol.EXIT_IO
    else:
        note, code = "no emergency checkpoint: the last one stands, later work is lost", protocol.EXIT_IO
    return Transition(replace(m, state=State.STOPPED), (KillGroup(), *_finish(m, code)),
                      f"worker exited ({how}) after the stop request: {note}")


def _on_exit(m: Machine, event: WorkerExited, now: float, policy: RestartPolicy) -> Transition:
    how = f"exit code {event.code}" if event.code is not None else f"signal {_signal_name(event.signal)}"
    if event.note:
        how += f": {event.note}"
    if event.code == protocol.EXIT_ROLLBACK:
        return _on_anomaly(m, event, now, policy)
    if event.code == protocol.EXIT_OK and (event.finished or not m.stopping):
        # training done, its final checkpoint committed: a stop that came meanwhile (finish() takes
        # none) lost nothing, and a finished job is not requeued
        return Transition(replace(m, state=State.SUCCEEDED), (KillGroup(), Finish(protocol.EXIT_OK)),
                          "worker finished (exit code 0)" + (" before it took the stop request" if m.stopping else ""))
    if m.stopping:
        return _on_stopped(m, event, how)
    if event.code == protocol.EXIT_CONFIG:
        return Transition(replace(m, state=State.FAILED), (KillGroup(), Finish(protocol.EXIT_CONFIG)),
                          "worker reported a configuration error (exit code 78): not retrying")
    cause = _cause(m, event)
    # Only a crash can be the checkpoint's fault: a hang (a long evaluation), a SIGKILL (the OOM
    # killer, an operator) or a failed save (a full disk) right after loading say nothing about it.
    suspect = event.suspect_step if cause == "crash" else None
    return _on_failure(m, cause, suspect, f"worker died ({how}, {cause})", now, policy)


def _finish(m: Machine, code: int) -> tuple[Action, ...]:
    return (Finish(code), Requeue()) if m.requeue else (Finish(code),)


def _on_anomaly(m: Machine, event: WorkerExited, now: float, policy: RestartPolicy) -> Transition:
    """Exit 76: the worker's loss went bad at `anomaly_step`. Its checkpoints from there on are set
    aside; the next start resumes from before it, at once, without spending the crash budget."""
    step = event.anomaly_step if event.anomaly_step is not None else max((event.last_step or 1) - 1, 0)
    what = f"the loss went bad at step {step} (exit code 76)"
    actions: tuple[Action, ...] = (KillGroup(), RollBack(step))
    if m.stopping:
        return Transition(replace(m, state=State.STOPPED), actions + _finish(m, protocol.EXIT_OK),
                          f"{what} after the stop request: no emergency checkpoint of a bad state; "
                          "the checkpoints before it stand")
    failures = m.failures + (Failure(now, "rollback", None),)
    count = max(event.anomalies, sum(f.cause == "rollback" for f in failures))
    if count > policy.max_rollbacks:
        return Transition(replace(m, state=State.FAILED, failures=failures),
                          actions + (Finish(protocol.EXIT_ROLLBACK),),
                          f"{what}; giving up: the loss went bad {count} times (rollback.max = {policy.max_rollbacks})")
    return Transition(replace(m, state=State.BACKOFF, failures=failures, kill_cause=None),
                      actions + (SetTimer("backoff", 0.0),),
                      f"{what}: rolling back to before step {step} (rollback {count} of {policy.max_rollbacks})")


def _on_failure(m: Machine, cause: str, suspect_step: Optional[int], what: str, now: float,
                policy: RestartPolicy) -> Transition:
    failures = m.failures + (Failure(now, cause, suspect_step),)  # type: ignore[arg-type]
    decision = decide(policy, failures, now, m.fell_back)
    actions: tuple[Action, ...] = (KillGroup(),)
    if cause == "bad-checkpoint":
        actions += (QuarantineResume(),)  # damaged: moved aside, the one before it is used
    elif decision.action == "fallback":
        actions += (SetAsideResume(),)  # suspect: not used again here, never deleted or hidden
    if decision.action == "give-up":  # 74 when what ended it is that checkpoints cannot be written
        code = protocol.EXIT_IO if cause == "save-failed" else protocol.EXIT_FAILED
        return Transition(replace(m, state=State.FAILED, failures=failures), actions + (Finish(code),),
                          f"{what}; giving up: {decision.reason}")
    fallback = decision.action == "fallback"
    return Transition(replace(m, state=State.BACKOFF, failures=failures, fell_back=m.fell_back or fallback,
                              fallback_next=fallback, kill_cause=None),
                      actions + (SetTimer("backoff", decision.delay_s),),
                      f"{what}: {decision.reason}; restart in {decision.delay_s:g}s")


def _cause(m: Machine, event: WorkerExited) -> str:
    if m.kill_cause == "hang":
        return "hang"
    if event.code == protocol.EXIT_SAVED_RESUME_ME:
        return "preempted"  # saved and asked to be resumed, without a stop from us (e.g. SLURM)
    if event.code == protocol.EXIT_BAD_CHECKPOINT:
        return "bad-checkpoint"
    if event.code == protocol.EXIT_IO:
        return "save-failed"  # its checkpoints could not be committed (a full disk): a failure, backed off
    if event.signal == signal.SIGKILL:
        return "killed"  # not by us: the OOM killer, or an operator
    return "crash"


def _signal_name(number: Optional[int]) -> str:
    try:
        return signal.Signals(number).name  # type: ignore[arg-type]
    except (ValueError, TypeError):
        return str(number)
