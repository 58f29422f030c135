"""`savegame run`: the loop that drives the state machine with real processes, signals and time.

Signal handlers only record (and wake the loop through a pipe); the loop turns what happened into
events, `machine.transition` decides, and `_perform` carries the actions out. Deadlines use
time.monotonic().
"""
from __future__ import annotations

import collections
import logging
import os
import selectors
import signal
import time
from typing import Any, Mapping, Optional

from savegame import protocol
from savegame.protocol import ProgressCell
from savegame.config import Layer, RunConfig, build_config, explicit_for_worker
from savegame.daemon import machine as m
from savegame.daemon.events import EventInbox, next_heartbeat, number
from savegame.daemon.mirror import Mirror
from savegame.daemon.preemption import PreemptionWatcher, notice_source
from savegame.daemon.process import WorkerProcess, worker_env
from savegame.daemon.resume import ResumeChooser, ResumePoint
from savegame.daemon.rundir import lock_run_folder, open_mirror, open_run_folder, run_id_of
from savegame.daemon.sdnotify import Notifier
from savegame.daemon.status import STATUS_DIR, write_status, write_worker_settings
from savegame.daemon.tiers import prune_local
from savegame.daemon.watcher import FolderWatcher
from savegame.errors import ConfigError, StorageError

log = logging.getLogger("savegame")
STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGHUP: "SIGHUP"}
STATUS_INTERVAL_S = 1.0


def run_supervised(config: RunConfig) -> int:
    return Supervisor(config).run()


class Supervisor:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.local = open_run_folder(config["dir"] or "./checkpoints")
        self.run_dir = self.local.location.path
        self._lock_fd = lock_run_folder(self.run_dir)
        self.remote = open_mirror(config) if config["mirror"] else None
        self.run_id = run_id_of(self.run_dir)
        self.policy = config.restart_policy()
        self.machine = m.Machine(grace_s=config["grace"])
        self.chooser = ResumeChooser(self.local, self.remote, config.monitor)
        self.notifier = Notifier()
        self.inbox = EventInbox()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.mirror = (Mirror(self.local, self.remote, config.retention("mirror"), config.monitor, self.wake,
                              config["stale_after"], config["upload_timeout"]) if self.remote else None)
        self.watcher = FolderWatcher(self.run_dir, self._folder_changed)
        self.preemption = (PreemptionWatcher(notice_source(config["preemption"]), config["preemption_interval"],
                                             self._on_preemption_notice) if config["preemption"] else None)
        self.notices: collections.deque[str] = collections.deque()
        self.worker: Optional[WorkerProcess] = None
        self.resume_point: Optional[ResumePoint] = None
        self.attempt = 0
        self.timers: dict[str, float] = {}
        self.events: collections.deque[m.Event] = collections.deque()
        self.signals: collections.deque[int] = collections.deque()
        self.exit_code: Optional[int] = None
        self.restarts: collections.Counter[str] = collections.Counter()
        self.heartbeat: dict[str, Any] = {}
        self.last_checkpoint: dict[str, Any] = {}
        self.last_event_mono = time.monotonic()
        self._dirty = True
        self._status_at = 0.0
        self._watchdog_at = 0.0
        self._emergency_step: Optional[int] = None
        self._exit_reported = False
        self.progress: Optional[ProgressCell] = None
        self._fresh_start_steps: set[int] = set()  # with resume=none: old checkpoints a restart must not use
        self._set_aside: set[int] = set()  # quarantined here as suspect: not to be fetched from the mirror
        self._status_error_logged = False
        self._protected: dict[int, str] = {}  # what local retention keeps for now (resume source, unmirrored)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        selector.register(self.inbox.fileno(), selectors.EVENT_READ)
        try:
            self._start_up()
            while True:
                self._tick()
                if self.exit_code is not None:
                    break
                selector.select(self._timeout())
                self._drain_wake_pipe()
        finally:
            self._shutdown(selector)
        return self.exit_code

    def _start_up(self) -> None:
        self._install_signals()
        self._write_status("starting")
        self.settings_path = write_worker_settings(self.run_dir, explicit_for_worker(self.config))
        self._collect_garbage()
        try:
            self.watcher.start()
        except OSError as exc:  # e.g. the inotify watch limit: worker events still arrive
            log.warning("cannot watch %s (%s); relying on the worker's events", self.run_dir, exc)
        if self.mirror:
            self.mirror.start()
        if self.preemption:
            self.preemption.start()
        log.info("run %s in %s%s", self.run_id, self.run_dir, f", mirrored to {self.remote.url}" if self.remote else "")
        self._perform(m.StartWorker(fallback=False))

    def _tick(self) -> None:
        self._take_signals()
        self._take_worker_events()
        self._check_worker_exit()
        self._check_timers()
        self._check_hang()
        while self.events and self.exit_code is None:
            self._apply(self.events.popleft())
        self._housekeeping()

    def _timeout(self) -> float:
        deadlines = list(self.timers.values())
        if self.notifier.watchdog_interval_s:
            deadlines.append(self._watchdog_at + self.notifier.watchdog_interval_s)
        if self.config["hang_timeout"] and self.machine.state == m.State.RUNNING:
            deadlines.append(self.last_event_mono + self.config["hang_timeout"])
        soonest = min(deadlines, default=time.monotonic() + 1.0)
        return max(0.0, min(soonest - time.monotonic(), 1.0))

    def wake(self) -> None:
        """Called from other threads (mirror, folder watcher) to have the loop look again."""
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass
        self._dirty = True

    def _folder_changed(self) -> None:
        """A checkpoint folder appeared (the backstop for lost events): retention and mirror look again."""
        if self.mirror:
            self.mirror.request_sync()
        self.wake()

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- inputs -> events -----------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (*STOP_SIGNALS, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(signum, lambda num, frame: self.signals.append(num))

    def _on_preemption_notice(self, what: str) -> None:
        """Called from the watcher thread: the VM is about to be taken away."""
        self.notices.append(what)
        self.wake()

    def _take_signals(self) -> None:
        while self.notices:
            self.events.append(m.StopRequested(self.notices.popleft()))
        while self.signals:
            signum = self.signals.popleft()
            if signum in STOP_SIGNALS:
                self.events.append(m.StopRequested(STOP_SIGNALS[signal.Signals(signum)]))
            elif signum == signal.SIGUSR1:
                self.events.append(m.CheckpointRequested())

    def _take_worker_events(self) -> None:
        for event in self.inbox.drain(self._accept_sender):
            self.last_event_mono = time.monotonic()
            kind = event["event"]
            if kind in ("heartbeat", "started", "resumed", "saving", "stopping", "finished"):
                self.heartbeat = next_heartbeat(self.heartbeat, event, time.time())
            if kind in ("started", "resumed") and isinstance(event.get("policy"), dict):
                self._adopt_worker_policy(event["policy"])
            if kind == "committed":
                self._note_commit(event)
            elif kind == "saving":
                self.notifier.extend_timeout(self.config["grace"] + self.config["mirror_deadline"] + 5)
            elif kind == "bad-checkpoint":
                log.error("the worker could not load step %s: %s", event.get("step"), event.get("problem"))

    def _accept_sender(self, pid: int, uid: int) -> bool:
        """Events count only from this user's processes that belong to the current worker."""
        return uid == os.getuid() and self.worker is not None and self.worker.owns(pid)

    def _adopt_worker_policy(self, policy: Mapping[str, Any]) -> None:
        """The script's own Checkpointer settings (its monitored metric, what it keeps) apply to
        retention here too; what was given to `savegame run` still wins."""
        try:
            config = build_config([Layer("the worker's Checkpointer settings", policy),
                                   Layer("savegame run settings", self.config.explicit)])
        except ConfigError as exc:
            log.warning("ignoring the worker's settings: %s", exc)
            return
        if config.values == self.config.values:
            return
        self.config = config
        self.chooser.monitor = config.monitor
        if self.mirror:
            self.mirror.set_policy(config.retention("mirror"), config.monitor)
        if config.monitor:
            log.info("retention follows the worker's settings: monitor %s (%s)", *config.monitor)
        self._dirty = True

    def _note_commit(self, event: Mapping[str, Any]) -> None:
        self.last_checkpoint = {k: event.get(k) for k in ("step", "epoch", "reason", "path", "bytes", "metrics")}
        self.last_checkpoint["time"] = time.time()
        step = number(event, "step")
        if event.get("reason") == "emergency" and step is not None:
            self._emergency_step = int(step)
        self._dirty = True
        if self.mirror:
            self.mirror.request_sync(self._emergency_step)

    def _check_worker_exit(self) -> None:
        if self.worker is None or self._exit_reported:
            return
        status = self.worker.poll()
        if status is None:
            return
        self._exit_reported = True
        self._take_worker_events()  # whatever it said before dying (its last commit, say)
        code, signum = status
        self.events.append(m.WorkerExited(code, signum, self._step_reached()))
        self._collect_garbage()  # a dead worker's half-written checkpoint
        self.timers.pop("grace", None)
        self.timers.pop("dump", None)
        self._dirty = True

    def _collect_garbage(self) -> None:
        try:
            for path in self.local.collect_garbage(self.config["stale_after"]):
                log.info("removed the leftovers of an unfinished save: %s", path)
        except StorageError as exc:
            log.warning("cannot collect stale staging: %s", exc)

    def _step_reached(self) -> Optional[int]:
        """The step the worker was at when it died (None if it never reached a step boundary)."""
        step = self.progress.read() if self.progress else None
        if step is None and self.resume_point is not None:
            step = self.resume_point.info.step
        return step

    def _check_timers(self) -> None:
        now = time.monotonic()
        for name, deadline in list(self.timers.items()):
            if now >= deadline:
                del self.timers[name]
                self.events.append({"grace": m.GraceExpired(), "dump": m.DumpWaitOver(),
                                    "backoff": m.BackoffOver()}[name])

    def _check_hang(self) -> None:
        limit = self.config["hang_timeout"]
        silent = time.monotonic() - self.last_event_mono
        if limit and self.machine.state == m.State.RUNNING and silent >= limit:
            self.events.append(m.HangDetected(silent))
            self.last_event_mono = time.monotonic()  # report a hang once

    # -- the one place state changes ------------------------------------------------------------

    def _apply(self, event: m.Event) -> None:
        t = m.transition(self.machine, event, time.monotonic(), self.policy)
        before, was_stopping = self.machine.state, self.machine.stopping
        self.machine = t.machine
        if t.machine.state != before:
            level = logging.ERROR if t.machine.state == m.State.FAILED else logging.INFO
            log.log(level, "%s -> %s: %s", before.value, t.machine.state.value, t.reason)
            self.notifier.status(f"{t.machine.state.value}: {t.reason}")
        else:
            log.info("%s", t.reason)
        if isinstance(event, m.StopRequested) and t.machine.stopping and not was_stopping:
            self.notifier.stopping(t.reason)
        for action in t.actions:
            self._perform(action)
        self._write_status(t.reason)

    def _perform(self, action: m.Action) -> None:
        if isinstance(action, m.StartWorker):
            self._start_worker(action.fallback)
        elif isinstance(action, m.SignalWorker) and self.worker is not None:
            self.worker.send(action.signal)
        elif isinstance(action, m.KillGroup) and self.worker is not None:
            self.worker.kill_group()
        elif isinstance(action, m.SetTimer):
            self.timers[action.name] = time.monotonic() + action.seconds
        elif isinstance(action, m.QuarantineResume) and self.resume_point is not None:
            why = ("the worker could not load it" if self.machine.failures[-1].cause == "bad-checkpoint"
                   else "the worker kept failing after resuming from it")
            self.chooser.quarantine(self.resume_point.info.step, why)
            self._set_aside.add(self.resume_point.info.step)  # not fetched again from the mirror either
        elif isinstance(action, m.Finish):
            self._finish(action.exit_code)

    # -- actions ----------------------------------------------------------------------------------

    def _start_worker(self, fallback: bool) -> None:
        if self.worker is not None and self.machine.failures:
            self.restarts[self.machine.failures[-1].cause] += 1
        if self.attempt == 0 and self.config["resume"] == "none":
            self._fresh_start_steps = {c.step for c in self.local.list()}
            self.resume_point = None
        else:  # a restart always continues this run, whatever the first start did
            choice = "latest" if self.config["resume"] == "none" else self.config["resume"]
            with self.notifier.busy("choosing and verifying the checkpoint to resume from"):
                self.resume_point = self.chooser.choose(choice, exclude=self._fresh_start_steps | self._set_aside)
        self._log_resume(fallback)
        self.attempt += 1
        progress_path = os.path.join(self.run_dir, STATUS_DIR, "progress")
        if self.progress is not None:
            self.progress.close()
        self.progress = ProgressCell(progress_path, create=True)
        env = worker_env(os.environ, self.run_dir, self.resume_point.info.path if self.resume_point else None,
                         self.run_id, self.attempt, self.inbox.address, self.settings_path, progress_path)
        self._take_signals()
        if self.machine.stopping or any(isinstance(e, m.StopRequested) for e in self.events):
            return  # a stop arrived while preparing: the StopRequested event ends the run
        try:
            self.worker = WorkerProcess(self.config["command"], env)
        except ConfigError as exc:
            self.events.append(m.SpawnFailed(str(exc)))
            return
        self._exit_reported = False
        self.heartbeat = {}
        self.last_event_mono = time.monotonic()
        self.events.append(m.Spawned(self.worker.pid))
        if self.attempt == 1:
            self.notifier.ready(f"running: worker pid {self.worker.pid}")

    def _log_resume(self, fallback: bool) -> None:
        point = self.resume_point
        if point is None:
            log.info("starting fresh: %s", "resume is none" if self.config["resume"] == "none" else "no valid checkpoint")
            return
        why = "falling back one checkpoint" if fallback else f"the {self.config['resume']} valid checkpoint"
        log.info("resuming from step %d (%s, saved as %s) from %s: %s", point.info.step,
                 f"epoch {point.info.epoch}", point.info.reason, point.source, why)

    def _finish(self, code: int) -> None:
        if self.mirror and code == protocol.EXIT_OK:
            deadline = self.config["mirror_deadline"]
            self.notifier.extend_timeout(deadline + 5)
            self.mirror.request_sync(self._emergency_step)
            with self.notifier.busy("waiting for the mirror to catch up"):
                flushed = self.mirror.flush(deadline)
            if flushed:
                log.info("the mirror holds every checkpoint it should")
                self._prune_local()  # what waited for the mirror's confirmation can go now
            else:
                log.error("the mirror did not catch up within %gs (pending steps %s): they stay on local disk",
                          deadline, self.mirror.pending)
        self.exit_code = code

    # -- periodic work ----------------------------------------------------------------------------

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if self.notifier.watchdog_interval_s and now - self._watchdog_at >= self.notifier.watchdog_interval_s:
            self.notifier.watchdog()
            self._watchdog_at = now
        if self._dirty and self.exit_code is None:
            self._dirty = False
            self._prune_local()
        if now - self._status_at >= STATUS_INTERVAL_S:
            self._write_status()

    def _prune_local(self) -> None:
        resume = self.resume_point.info.step if self.resume_point else None
        deletable = self.mirror.unprotected_steps() if self.mirror else None
        try:
            self._protected = prune_local(self.local, self.config, resume, deletable)
        except StorageError as exc:
            log.warning("retention skipped: %s", exc)

    def _write_status(self, reason: Optional[str] = None) -> None:
        self._status_at = time.monotonic()
        if reason:
            self._reason = reason
        mirror = None
        if self.mirror and self.remote:
            last = self.mirror.last_upload
            lag = max(0.0, (self.last_checkpoint.get("time") or 0) - last[1]) if last else None
            mirror = {"url": self.remote.url, "pending": len(self.mirror.pending), "error": self.mirror.last_error,
                      "confirmed_step": last[0] if last else None, "lag_s": lag}
        status = {
            "state": self.machine.state.value, "reason": getattr(self, "_reason", ""), "daemon_pid": os.getpid(),
            "worker_pid": self.worker.pid if self.worker else None, "attempt": self.attempt, "run_id": self.run_id,
            "restarts": dict(self.restarts), "resumed_from": self.resume_point.info.step if self.resume_point else None,
            "last_checkpoint": self.last_checkpoint, "heartbeat": self.heartbeat, "mirror": mirror,
            "policy": explicit_for_worker(self.config),
            "protected": {str(step): why for step, why in self._protected.items()}}
        try:
            write_status(self.run_dir, status)
            self._status_error_logged = False
        except OSError as exc:  # a full disk must not take the supervisor down
            if not self._status_error_logged:
                log.warning("cannot write the status file: %s", exc)
                self._status_error_logged = True

    def _shutdown(self, selector: selectors.BaseSelector) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill_group()  # never leave an orphan behind
        self.watcher.stop()
        if self.preemption:
            self.preemption.stop()
        if self.mirror:
            self.mirror.close()
        self._write_status()
        signal.set_wakeup_fd(-1)
        selector.close()
        self.inbox.close()
