"""When to restart a dead worker: backoff, a budget per time window, and the same-step rule.

Pure: the daemon keeps the failure history and passes the clock in.
- Stops and preemptions never spend the budget (like submitit: a preemption is not a failure), but
  preemptions that follow each other quickly back off too: a worker that always exits 75 is not
  restarted hundreds of times a second.
- Failures back off exponentially, capped; more than `max_restarts` in `window_s` gives up.
- A worker that dies again and again right after loading the same checkpoint falls back one
  checkpoint, once; if it still does, the run gives up. Only such deaths count against a
  checkpoint (`Failure.step` is set for them alone): one that died before loading (a missing
  dataset) or after making progress says nothing about the checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

Cause = Literal["crash", "killed", "hang", "preempted", "bad-checkpoint", "spawn", "save-failed", "rollback"]
FAILURE_CAUSES = ("crash", "killed", "hang", "bad-checkpoint", "spawn", "save-failed")


PREEMPTION_WINDOW_S = 60.0  # preemptions closer than this to each other back off


@dataclass(frozen=True)
class Failure:
    time: float  # monotonic seconds
    cause: Cause
    step: Optional[int]  # the checkpoint it died right after loading (None: not about a checkpoint)


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 3600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_factor: float = 2.0
    same_step_limit: int = 3
    max_rollbacks: int = 3  # NaN/spike rollbacks per run ([rollback] max); one more gives up


@dataclass(frozen=True)
class Decision:
    action: Literal["restart", "fallback", "give-up"]
    delay_s: float
    reason: str


def decide(policy: RestartPolicy, failures: Sequence[Failure], now: float, fell_back: bool) -> Decision:
    """What to do after the last entry of `failures` (oldest first). `fell_back`: already done once."""
    last = failures[-1]
    if last.cause == "preempted":
        quick = [f for f in failures if f.cause == "preempted" and now - f.time <= PREEMPTION_WINDOW_S]
        delay = _backoff(policy, len(quick))
        return Decision("restart", delay, "preempted: not counted against the budget"
                        + (f" ({len(quick)} preemptions within {PREEMPTION_WINDOW_S:g}s: backing off)" if delay else ""))
    recent = [f for f in failures if f.cause in FAILURE_CAUSES and now - f.time <= policy.window_s]
    if len(recent) > policy.max_restarts:
        return Decision("give-up", 0.0, f"{len(recent)} failures within {policy.window_s:.0f}s "
                                        f"(the budget is {policy.max_restarts}); last: {last.cause}")
    stuck = _stuck_step(recent, policy.same_step_limit)
    if stuck is not None:
        if fell_back:
            return Decision("give-up", 0.0, f"the worker keeps dying right after loading its checkpoint "
                                            f"(step {stuck}), even after falling back one checkpoint")
        return Decision("fallback", _backoff(policy, len(recent)),
                        f"the worker died {policy.same_step_limit} times right after loading step {stuck}: "
                        "falling back one checkpoint")
    return Decision("restart", _backoff(policy, len(recent)), f"{last.cause} ({len(recent)} of "
                                                               f"{policy.max_restarts} in the window)")


def _stuck_step(recent: Sequence[Failure], limit: int) -> Optional[int]:
    tail = recent[-limit:]
    if limit <= 0 or len(tail) < limit:
        return None
    steps = {f.step for f in tail}
    return tail[-1].step if len(steps) == 1 and tail[-1].step is not None else None


def _backoff(policy: RestartPolicy, count: int) -> float:
    if count <= 1:
        return 0.0  # the first failure restarts at once: a one-off crash should cost no time
    return min(policy.backoff_max_s, policy.backoff_initial_s * policy.backoff_factor ** (count - 2))
