"""Goodput: where a run's time went, across all its attempts and daemons (`.savegame/attempts.jsonl`).

The daemon appends one line per worker attempt when it ends, and one per daemon when it exits:

    {"kind": "attempt", "attempt": 3, "daemon_pid": 41, "daemon_started": t0, "spawned": t1,
     "ready": t2, "ended": t3, "resumed_from": 100, "last_step": 180, "stall_s": 0.4, "saves": 4,
     "cause": "crash", "exit_code": 3, "signal": null, "restarted": true, "preempted": false}
    {"kind": "daemon", "pid": 41, "started": t0, "ended": t4, "exit_code": 0}

The records are facts; the accounting is done when read (`summarize`), so it can use what came
later: the work an attempt lost is the steps between where it got to and where the next attempt
resumed from (`last_step - next.resumed_from`), at that attempt's own pace. A daemon's life is:

- restarts: each worker's start, from its spawn to its first training call (imports, loading);
- stalls: the training thread saving (capture, copy, back-pressure), as the worker reports it;
- redone: training whose steps were lost at a death and done again;
- waiting: the daemon alive without a worker (backoff, choosing or fetching the resume
  checkpoint, the mirror's flush at the end);
- productive: the rest of the workers' training time.

goodput = productive / the daemons' lifetimes. Time with no daemon at all (between one daemon's exit
and the next one's start: a reboot, a stopped service) is shown as `down_s` and left out: a run
stopped on purpose for a week is not a run that wasted a week.
"""
from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field as dc_field, replace
from typing import Any, Iterable, Mapping, Optional

from savegame.errors import MalformedInput
from savegame.see import jsonl
from savegame.untrusted import field, integer, number, obj, optional, text

ATTEMPTS_PATH = ".savegame/attempts.jsonl"
MAX_ATTEMPTS_BYTES = 1 << 20  # some 3,000 attempts; past it the oldest half is folded into one line
ATTEMPT_FIELDS = ("attempt", "daemon_pid", "daemon_started", "spawned", "ready", "ended", "resumed_from", "last_step",
                  "stall_s", "saves", "cause", "exit_code", "signal", "restarted", "preempted")
CATEGORIES = ("productive", "redone", "restarts", "stalls", "waiting")
FAILURES = ("crash", "killed", "hang", "preempted", "bad-checkpoint", "save-failed", "rollback", "spawn")


@dataclass(frozen=True)
class Attempt:
    attempt: int
    daemon: tuple[int, float]  # (pid, start time): which daemon ran it
    spawned: float
    ready: Optional[float]
    ended: float
    resumed_from: Optional[int]
    last_step: Optional[int]
    stall_s: float = 0.0
    saves: int = 0
    cause: str = "?"
    exit_code: Optional[int] = None
    signal: Optional[str] = None
    restarted: bool = False
    preempted: bool = False
    open: bool = False  # still running (from the daemon's status, not the record)


@dataclass(frozen=True)
class DaemonLife:
    pid: int
    started: float
    ended: float
    exit_code: Optional[int] = None
    open: bool = False


@dataclass
class Summary:
    seconds: dict[str, float] = dc_field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    down_s: float = 0.0
    lost_steps: int = 0
    attempts: int = 0
    daemons: int = 0
    restarts: collections.Counter = dc_field(default_factory=collections.Counter)
    preemptions: int = 0
    saves: int = 0
    rows: list[dict[str, Any]] = dc_field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.seconds.values())

    @property
    def goodput(self) -> Optional[float]:
        return self.seconds["productive"] / self.total_s if self.total_s > 0 else None

    def to_json(self, rows: bool = False) -> dict[str, Any]:
        data = {"goodput": self.goodput, "total_s": self.total_s, "seconds": dict(self.seconds),
                "down_s": self.down_s, "lost_steps": self.lost_steps, "attempts": self.attempts,
                "daemons": self.daemons, "restarts": dict(self.restarts), "preemptions": self.preemptions,
                "saves": self.saves}
        return {**data, "rows": self.rows} if rows else data


# -- parsing -------------------------------------------------------------------------------------

def _time(value: Any) -> float:
    seconds = number(value)
    if not 0 <= seconds < 1e11:
        raise ValueError("is not a time")
    return seconds


def parse_attempt(r: Mapping[str, Any], what: str) -> Attempt:
    step = optional(integer(0, 10**12))
    spawned, ended = field(r, "spawned", _time, what), field(r, "ended", _time, what)
    ready = field(r, "ready", optional(_time), what, None)
    if ended < spawned or (ready is not None and not spawned <= ready <= ended):
        raise MalformedInput(f"{what}: times out of order")
    return Attempt(field(r, "attempt", integer(1), what),
                   (field(r, "daemon_pid", integer(1), what), field(r, "daemon_started", _time, what)),
                   spawned, ready, ended, field(r, "resumed_from", step, what, None),
                   field(r, "last_step", step, what, None), field(r, "stall_s", _seconds, what, 0.0),
                   field(r, "saves", integer(0), what, 0), field(r, "cause", text(32), what, "?"),
                   field(r, "exit_code", optional(integer(0, 255)), what, None),
                   field(r, "signal", optional(text(16)), what, None), field(r, "restarted", _boolean, what, False),
                   field(r, "preempted", _boolean, what, False))


def parse_daemon(r: Mapping[str, Any], what: str) -> DaemonLife:
    started, ended = field(r, "started", _time, what), field(r, "ended", _time, what)
    if ended < started:
        raise MalformedInput(f"{what}: times out of order")
    return DaemonLife(field(r, "pid", integer(1), what), started, ended,
                      field(r, "exit_code", optional(integer(0, 255)), what, None))


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _seconds(value: Any) -> float:
    seconds = number(value)
    if seconds < 0:
        raise ValueError("must be >= 0")
    return seconds


@dataclass
class Ledger:
    attempts: list[Attempt]
    daemons: list[DaemonLife]
    earlier: list[dict[str, Any]]  # folded summaries of the oldest records
    skipped: int = 0


def parse_ledger(records: Iterable[Mapping[str, Any]], what: str, skipped: int = 0) -> Ledger:
    ledger = Ledger([], [], [], skipped)
    for number_, record in enumerate(records, 1):
        where = f"{what} record {number_}"
        try:
            kind = record.get("kind")
            if kind == "attempt":
                ledger.attempts.append(parse_attempt(record, where))
            elif kind == "daemon":
                ledger.daemons.append(parse_daemon(record, where))
            elif kind == "earlier":
                ledger.earlier.append(_earlier(record, where))
            else:
                raise MalformedInput(f"{where}: unknown kind")
        except MalformedInput:
            ledger.skipped += 1
    return ledger


def _earlier(r: Mapping[str, Any], what: str) -> dict[str, Any]:
    seconds = obj(r.get("seconds"), f"{what}: seconds")
    restarts = obj(r.get("restarts", {}), f"{what}: restarts")
    return {"seconds": {c: field(seconds, c, _seconds, what, 0.0) for c in CATEGORIES},
            "down_s": field(r, "down_s", _seconds, what, 0.0), "lost_steps": field(r, "lost_steps", integer(), what, 0),
            "attempts": field(r, "attempts", integer(), what, 0), "daemons": field(r, "daemons", integer(), what, 0),
            "restarts": {str(k)[:32]: field(restarts, k, integer(), what) for k in list(restarts)[:32]},
            "preemptions": field(r, "preemptions", integer(), what, 0), "saves": field(r, "saves", integer(), what, 0)}


# -- accounting ----------------------------------------------------------------------------------

def summarize(ledger: Ledger, next_resume: Optional[int] = None, *, missing_next: bool = True) -> Summary:
    """Where the time went. `next_resume`: where the attempt after the last one resumed from, when
    that attempt is not in `ledger` (folding); otherwise the last attempt's lost work is not known yet."""
    summary = Summary()
    for earlier in ledger.earlier:
        _add_earlier(summary, earlier)
    attempts = sorted(ledger.attempts, key=lambda a: a.spawned)
    for i, attempt in enumerate(attempts):
        following = attempts[i + 1].resumed_from if i + 1 < len(attempts) else next_resume
        known = i + 1 < len(attempts) or not missing_next
        _add_attempt(summary, attempt, following if known else None, known)
    _add_daemons(summary, ledger.daemons, attempts)
    return summary


def _add_attempt(summary: Summary, a: Attempt, next_resume: Optional[int], next_known: bool) -> None:
    span = a.ended - a.spawned
    startup = (a.ready if a.ready is not None else a.ended) - a.spawned
    training = span - startup
    stall = min(a.stall_s, training)
    done = max(0, (a.last_step or 0) - (a.resumed_from or 0)) if a.last_step is not None else 0
    lost = 0
    if next_known and not a.open and a.cause != "finished" and a.last_step is not None:
        lost = max(0, a.last_step - (next_resume or 0))
    pace = (training - stall) / done if done else 0.0
    redone = min(training - stall, min(lost, done) * pace)
    summary.seconds["restarts"] += startup
    summary.seconds["stalls"] += stall
    summary.seconds["redone"] += redone
    summary.seconds["productive"] += training - stall - redone
    summary.lost_steps += lost
    summary.attempts += 1
    summary.saves += a.saves
    summary.preemptions += a.preempted or a.cause == "preempted"
    if a.restarted:
        summary.restarts[a.cause] += 1
    summary.rows.append({"attempt": a.attempt, "daemon_pid": a.daemon[0], "spawned": a.spawned, "span_s": span,
                         "startup_s": startup, "stall_s": stall, "resumed_from": a.resumed_from,
                         "last_step": a.last_step, "cause": "running" if a.open else a.cause,
                         "exit_code": a.exit_code, "signal": a.signal, "lost_steps": lost, "redone_s": redone,
                         "preempted": a.preempted or a.cause == "preempted", "restarted": a.restarted})


def _add_daemons(summary: Summary, daemons: list[DaemonLife], attempts: list[Attempt]) -> None:
    """Waiting: each daemon's life less its workers' spans. A daemon without its record (killed, and
    not recovered) lived at least as long as its attempts."""
    spans: dict[tuple[int, float], list[Attempt]] = collections.defaultdict(list)
    for a in attempts:
        spans[a.daemon].append(a)
    lives = {(d.pid, d.started): d for d in daemons}
    for key, its in spans.items():
        if key not in lives:
            lives[key] = DaemonLife(key[0], min(key[1], *(a.spawned for a in its)), max(a.ended for a in its))
    ordered = sorted(lives.values(), key=lambda d: d.started)
    for d in ordered:
        busy = sum(a.ended - a.spawned for a in spans.get((d.pid, d.started), []))
        summary.seconds["waiting"] += max(0.0, d.ended - d.started - busy)
    for before, after in zip(ordered, ordered[1:]):
        summary.down_s += max(0.0, after.started - before.ended)
    summary.daemons += len(ordered)


def _add_earlier(summary: Summary, earlier: Mapping[str, Any]) -> None:
    for category in CATEGORIES:
        summary.seconds[category] += earlier["seconds"][category]
    summary.down_s += earlier["down_s"]
    summary.lost_steps += earlier["lost_steps"]
    summary.attempts += earlier["attempts"]
    summary.daemons += earlier["daemons"]
    summary.restarts.update(earlier["restarts"])
    summary.preemptions += earlier["preemptions"]
    summary.saves += earlier["saves"]


def fold(dropped: list[dict[str, Any]], kept: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The one line that stands for the oldest records when the file is compacted."""
    later = parse_ledger(kept, "kept").attempts
    first_kept = min(later, key=lambda a: a.spawned).resumed_from if later else None
    summary = summarize(parse_ledger(dropped, "dropped"), first_kept, missing_next=not later)
    data = summary.to_json()
    return [{"kind": "earlier", **{k: data[k] for k in ("seconds", "down_s", "lost_steps", "attempts", "daemons",
                                                        "restarts", "preemptions", "saves")}}]


def with_open(ledger: Ledger, daemon: Optional[DaemonLife], attempt: Optional[Attempt]) -> Ledger:
    """The ledger with the running daemon and its running attempt (not recorded until they end)."""
    daemons = ledger.daemons + ([replace(daemon, open=True)] if daemon else [])
    attempts = ledger.attempts + ([replace(attempt, open=True)] if attempt else [])
    return Ledger(attempts, daemons, ledger.earlier, ledger.skipped)


# -- the file ------------------------------------------------------------------------------------

def attempts_file(run_dir: str) -> str:
    return os.path.join(run_dir, ATTEMPTS_PATH)


def load_ledger(run_dir: str) -> Ledger:
    """The run folder's attempt records (empty when there are none). OSError, MalformedInput."""
    lines = jsonl.read(attempts_file(run_dir), MAX_ATTEMPTS_BYTES)
    return parse_ledger(lines.records, attempts_file(run_dir), lines.skipped)


def append_record(run_dir: str, record: Mapping[str, Any]) -> None:
    """One line more (compacted past the limit, the oldest half folded). OSError, MalformedInput."""
    jsonl.append(attempts_file(run_dir), record, MAX_ATTEMPTS_BYTES, fold)


# -- in words ------------------------------------------------------------------------------------

def human_seconds(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds != seconds:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s" if seconds >= 1 else f"{seconds:.2f}s"


def describe(data: Any) -> str:
    """One line of a summary's JSON (`Summary.to_json`), read back from a status file: wrong types show as '?'."""
    data = data if isinstance(data, dict) else {}
    seconds = data.get("seconds") if isinstance(data.get("seconds"), dict) else {}
    ratio = data.get("goodput")
    share = f"{ratio * 100:.1f}%" if isinstance(ratio, (int, float)) and not isinstance(ratio, bool) else "-"
    steps = data.get("lost_steps")
    lost = ", ".join(f"{c} {human_seconds(seconds.get(c))}" + (f" ({steps} steps)" if c == "redone" and steps else "")
                     for c in CATEGORIES[1:])
    return (f"{share} of {human_seconds(data.get('total_s'))} (productive {human_seconds(seconds.get('productive'))}; "
            f"{lost})")
