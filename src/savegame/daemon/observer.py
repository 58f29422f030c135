"""What the daemon records so a run can be seen: its attempts (goodput), its history, its metrics.

The supervisor calls a few hooks (a transition, a worker event, a retention pass, the end); this
module keeps the records and never changes what the daemon does. A record that cannot be written
(a full disk) costs a warning, never the run. The running attempt and the daemon itself are not in
`attempts.jsonl` until they end: they are in `status.json` ("ledger"), so a daemon that was killed
is recorded by the next one from its last status.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from savegame.daemon import machine as m
from savegame.daemon.counts import Counts, metrics_snapshot
from savegame.daemon.events import number
from savegame.daemon.status import TERMINAL_STATES, read_status
from savegame.errors import ConfigError, MalformedInput
from savegame.see import goodput as g
from savegame.see import history

if TYPE_CHECKING:
    from savegame.daemon.supervisor import Supervisor

log = logging.getLogger("savegame")
LOST_EVENT_AFTER_S = 60.0  # a commit listed this long without its event is recorded from the listing
PERSON_STOPS = ("SIGTERM", "SIGINT", "SIGHUP")  # any other stop is a notice or the scheduler's signal


def _guarded(method: Callable[..., Any]) -> Callable[..., Any]:
    """A hook that fails (a bug here) is logged, once, and never takes the supervisor down."""
    @functools.wraps(method)
    def call(self: "Observer", *args: Any) -> Any:
        try:
            return method(self, *args)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - seeing the run must not cost the run
            if method.__name__ not in self.failed_hooks:
                self.failed_hooks.add(method.__name__)
                log.exception("internal error in the run's records (%s); the run goes on", method.__name__)
            return None
    return call


class Observer:
    def __init__(self, daemon: "Supervisor") -> None:
        self.d = daemon
        self.failed_hooks: set[str] = set()
        self.run_dir = daemon.run_dir
        self.life = g.DaemonLife(os.getpid(), time.time(), time.time())
        self.current: Optional[dict[str, Any]] = None  # the running attempt's record, as it grows
        self._workers: dict[int, tuple[float, int]] = {}  # pid -> (stall_s, saves) it reported last
        self._warned = False
        self._snapshot: dict[str, Any] = {}
        self._last_told: tuple[int, Any] = (-1, None)  # the last commit a worker told of
        self.closed = False  # the daemon recorded itself: no longer an open record
        self.ledger = self._load()
        self._recover(read_status(self.run_dir))
        self.counts = Counts.of(self.run_dir)
        self.exporter = self._exporter(daemon.settings)
        if daemon.mirror is not None:
            daemon.mirror.on_pruned = self.mirror_pruned
            daemon.mirror.records = lambda remote: history.upload_history(self.run_dir, remote)

    def _load(self) -> g.Ledger:
        try:
            return g.load_ledger(self.run_dir)
        except (OSError, MalformedInput) as exc:
            log.warning("cannot read the run's attempt records (%s): goodput starts over", exc)
            return g.Ledger([], [], [])

    def _exporter(self, settings: Any) -> Any:
        if not settings["metrics"] and not settings["metrics_textfile"]:
            return None
        try:
            from savegame.daemon.metrics import MetricsExporter
        except ImportError:
            raise ConfigError("metrics need the prometheus_client package: pip install 'savegame[metrics]'") from None
        exporter = MetricsExporter(settings["metrics"], settings["metrics_textfile"],
                                   os.path.basename(self.run_dir), self.snapshot)
        exporter.start()
        return exporter

    @_guarded
    def _recover(self, previous: Optional[Mapping[str, Any]]) -> None:
        """The daemon before this one was killed (its status is not final): record what it was doing.
        (Its pid says nothing: the run folder's lock is ours, so it is gone; as PID 1 of a container,
        it had ours. A daemon is its pid and its start time.)"""
        section = previous.get("ledger") if previous else None
        if not isinstance(section, dict) or previous.get("state") in TERMINAL_STATES:  # type: ignore[union-attr]
            return
        updated = previous.get("updated")  # type: ignore[union-attr]
        try:
            daemon = g.parse_daemon({**obj_or_empty(section.get("daemon")), "ended": updated}, "the last status")
        except MalformedInput:
            return
        if any((d.pid, d.started) == (daemon.pid, daemon.started) for d in self.ledger.daemons):
            return  # it recorded itself, and was killed before its last status
        attempt = section.get("attempt")
        recorded = any(a.daemon == (daemon.pid, daemon.started) and a.attempt == obj_or_empty(attempt).get("attempt")
                       for a in self.ledger.attempts)  # it ended, and the daemon was killed before its next status
        if isinstance(attempt, dict) and not recorded:
            times = [t for t in (attempt.get("spawned"), attempt.get("ready"))
                     if isinstance(t, (int, float)) and not isinstance(t, bool)]
            known = {k: attempt[k] for k in g.ATTEMPT_FIELDS if k in attempt}  # nothing else from a file is copied
            self._append({**known, "kind": "attempt", "ended": max([daemon.ended, *times]), "cause": "daemon-lost"})
        self._append({"kind": "daemon", "pid": daemon.pid, "started": daemon.started, "ended": daemon.ended})
        log.info("recorded the attempt of the daemon before this one (pid %d): it ended without recording it",
                 daemon.pid)

    # -- hooks -----------------------------------------------------------------------------------

    @_guarded
    def transitioned(self, event: m.Event, before: m.Machine, after: m.Machine) -> None:
        if isinstance(event, m.Spawned):
            self._open_attempt()
        elif isinstance(event, m.WorkerExited) and self.current is not None:
            self._close_attempt(event, _cause(event, before, after), after.state == m.State.BACKOFF)
        elif isinstance(event, m.StopRequested) and after.stopping and not before.stopping and self.current:
            self.current["preempted"] = event.requeue or event.signal_name not in PERSON_STOPS

    @_guarded
    def worker_event(self, event: Mapping[str, Any]) -> None:
        kind, current = event.get("event"), self.current
        if current is None:
            return
        if kind == "hello" and current["ready"] is None:
            current["ready"] = round(time.time(), 3)
        if kind == "resumed" and number(event, "resumed_from") is not None:
            current["resumed_from"] = int(number(event, "resumed_from"))  # type: ignore[arg-type]
        stall, saves = number(event, "stall_s"), number(event, "saves")
        if stall is not None and saves is not None and stall >= 0 and saves >= 0:
            self._workers[int(event["pid"])] = (stall, int(saves))  # ranks save side by side: the slowest counts
        if kind == "committed" and number(event, "step") is not None:
            self._committed(event)
        elif kind == "save-failed" and number(event, "step") is not None:
            entry = history.failed_entry(int(number(event, "step")), event.get("reason"),  # type: ignore[arg-type]
                                         event.get("error"), current["attempt"])
            self.counts.note(entry)
            history.record(self.run_dir, entry)

    def _committed(self, event: Mapping[str, Any]) -> None:
        step = int(number(event, "step"))  # type: ignore[arg-type]
        if self._last_told == (step, event.get("reason")):
            return  # the same commit, told by another rank of the job
        self._last_told = (step, event.get("reason"))
        epoch, persist = number(event, "epoch"), number(event, "persist_s")
        entry = history.commit_entry(step, None if epoch is None else int(epoch), event.get("reason"),
                                     event.get("metrics"), event.get("bytes"), self.current_attempt, "daemon",
                                     None if persist is None or persist < 0 else persist)
        self.counts.note(entry)
        history.record(self.run_dir, entry)

    @_guarded
    def retention(self, listed: list[Any], deleted: list[int], config: Any) -> None:
        """Local retention ran: what it deleted, and any commit the daemon did not hear of (a lost event)."""
        now = time.time()
        for info in listed:  # its event comes right after the folder appears: give it time
            if info.step not in self.counts.steps and now - info.created.timestamp() > LOST_EVENT_AFTER_S:
                entry = history.commit_entry(info.step, info.epoch, info.reason, dict(info.metrics), info.bytes,
                                             None, "listing")
                self.counts.note(entry)
                history.record(self.run_dir, entry)
        why = history.prune_why(config, "local")
        for step in deleted:
            self._pruned(history.prune_entry(step, "local", "daemon", why))

    @_guarded
    def mirror_pruned(self, step: int) -> None:
        """Called from the mirror's thread: the bucket's retention deleted a step."""
        self._pruned(history.prune_entry(step, "mirror", "daemon", history.prune_why(self.d.config, "mirror")))

    def _pruned(self, entry: dict[str, Any]) -> None:
        self.counts.note(entry)
        history.record(self.run_dir, entry)

    # -- attempts --------------------------------------------------------------------------------

    @property
    def current_attempt(self) -> Optional[int]:
        if self.current is not None:
            return self.current["attempt"]
        return max((a.attempt for a in self.ledger.attempts), default=None)

    def _open_attempt(self) -> None:
        d = self.d
        earlier = sum(e["attempts"] for e in self.ledger.earlier)
        number_ = max((a.attempt for a in self.ledger.attempts), default=earlier) + 1
        self._workers = {}
        self.current = {"kind": "attempt", "attempt": number_, "daemon_pid": self.life.pid,
                        "daemon_started": self.life.started, "spawned": round(time.time(), 3), "ready": None,
                        "resumed_from": d.resume_point.info.step if d.resume_point else None, "last_step": None,
                        "stall_s": 0.0, "saves": 0, "preempted": False}

    def _refresh(self) -> None:
        current = self.current
        if current is None:
            return
        step = self.d.progress.read() if self.d.progress is not None else None
        if step is not None:
            current["last_step"] = step
        if self._workers:
            current["stall_s"] = round(max(s for s, _ in self._workers.values()), 4)
            current["saves"] = max(n for _, n in self._workers.values())

    def _close_attempt(self, event: m.WorkerExited, cause: str, restarted: bool) -> None:
        self._refresh()
        record = {**self.current, "ended": round(time.time(), 3), "cause": cause, "exit_code": event.code,
                  "signal": _signal_name(event.signal), "restarted": restarted}  # type: ignore[dict-item]
        if event.last_step is not None:
            record["last_step"] = event.last_step
        self.current = None
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        clean = {k: v for k, v in record.items() if v is not None or k in ("ready", "resumed_from", "last_step")}
        try:
            parsed = g.parse_ledger([clean], "a new record")
            if parsed.skipped:  # never write what a reader would skip
                raise MalformedInput(f"a record that does not check: {sorted(clean)}")
            g.append_record(self.run_dir, clean)
        except (OSError, MalformedInput, ValueError) as exc:
            if not self._warned:
                self._warned = True
                log.warning("cannot record the run's attempt (%s): goodput will miss it", exc)
            return
        self.ledger.attempts += parsed.attempts
        self.ledger.daemons += parsed.daemons

    @_guarded
    def close(self, exit_code: Optional[int]) -> None:
        """The daemon is done: its running attempt (if the worker outlived the loop) and itself."""
        if self.current is not None:
            self._close_attempt(m.WorkerExited(None, None, None), "daemon-exit", False)
        self._append({"kind": "daemon", "pid": self.life.pid, "started": self.life.started,
                      "ended": round(time.time(), 3), "exit_code": exit_code})
        self.closed = True
        self.status()  # the final figures
        if self.exporter is not None:
            self.exporter.close(self.snapshot())

    # -- what others read ------------------------------------------------------------------------

    def summary(self) -> g.Summary:
        self._refresh()
        now = time.time()
        attempt = None
        if self.current is not None:
            ended = max(now, self.current["spawned"], self.current["ready"] or 0.0)  # they are rounded
            attempt = g.parse_attempt({**self.current, "ended": ended}, "running")
        daemon = None if self.closed else g.DaemonLife(self.life.pid, self.life.started, now)
        return g.summarize(g.with_open(self.ledger, daemon, attempt))

    @_guarded
    def status(self) -> dict[str, Any]:
        """For status.json: the goodput so far, and the records not written yet (for a killed daemon)."""
        summary = self.summary()
        self._snapshot = metrics_snapshot(self.d, self.counts, summary)
        ledger = None if self.closed else {"daemon": {"pid": self.life.pid, "started": self.life.started},
                                           "attempt": self.current}
        url = self.exporter.url if self.exporter is not None and not self.closed else None
        return {"goodput": summary.to_json(), "ledger": ledger, "metrics_url": url}

    def status_or_nothing(self) -> dict[str, Any]:
        return self.status() or {}

    def snapshot(self) -> dict[str, Any]:
        """The latest figures for the metrics (read from the exporter's threads)."""
        return self._snapshot

    @_guarded
    def tick(self) -> None:
        if self.exporter is not None:
            self.exporter.tick(self.snapshot())


def obj_or_empty(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _cause(event: m.WorkerExited, before: m.Machine, after: m.Machine) -> str:
    new = after.failures[len(before.failures):]
    if new:
        return new[-1].cause
    if after.state == m.State.FAILED and event.code == 78:
        return "config"
    return {m.State.SUCCEEDED: "finished", m.State.STOPPED: "stopped", m.State.FAILED: "failed"}.get(after.state, "exited")


def _signal_name(signum: Optional[int]) -> Optional[str]:
    import signal

    try:
        return signal.Signals(signum).name if signum is not None else None  # type: ignore[arg-type]
    except ValueError:
        return str(signum)

