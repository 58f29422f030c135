"""`savegame run`: the loop that drives the state machine with real processes, signals and time.

Signal handlers only record (and wake the loop through a pipe); the loop turns what happened into
events, `machine.transition` decides, and `_perform` carries the actions out. Deadlines use
time.monotonic(). Start-up, the resume choice and the run's policy live in `startup.py`; the
status file and retention in `housekeeping.py`.
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
from savegame.config import RunConfig
from savegame.daemon import machine as m
from savegame.daemon.decisions import Decisions
from savegame.daemon.events import EventInbox, next_heartbeat, number
from savegame.daemon.handover import SnapshotTaker
from savegame.daemon.hang import HangWatch
from savegame.daemon.housekeeping import Housekeeping
from savegame.daemon.mirror import Mirror
from savegame.daemon.observer import Observer
from savegame.daemon.output import WorkerOutput, binary_stream
from savegame.daemon.preemption import Notice, PreemptionWatcher, notice_source
from savegame.daemon.process import SpawnError, WorkerProcess, become_subreaper, reap_children, worker_env
from savegame.daemon.nodes import NodesLock, node_of
from savegame.daemon.ranks import RankTable
from savegame.daemon.resume import ResumeChooser, ResumePoint
from savegame.daemon.rundir import LOCK_FILE, RunLock, open_mirror, open_run_folder, run_error, run_id_of
from savegame.daemon.sdnotify import Notifier
from savegame.daemon.startup import Startup
from savegame.daemon.status import STATUS_DIR
from savegame.daemon.watcher import FolderWatcher
from savegame.errors import ConfigError, SavegameError, StorageError

log = logging.getLogger("savegame")
STOP_SIGNALS = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT", signal.SIGHUP: "SIGHUP"}
HEARTBEAT_EVENTS = ("heartbeat", "started", "resumed", "saving", "stopping", "finished", protocol.EVENT_HELLO)
KNOWN_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")
INBOX_CHECK_S = 5.0


def run_supervised(settings: RunConfig) -> int:
    try:
        supervisor = Supervisor(settings)
    except SavegameError:
        raise
    except OSError as exc:  # the run folder cannot hold the daemon's own files (a full disk, an odd file)
        raise run_error(exc) from None
    return supervisor.run()


class Supervisor:
    def __init__(self, settings: RunConfig) -> None:
        self.settings = settings  # what `savegame run` was given: the config file and the flags
        run_dir = os.path.abspath(os.path.expanduser(settings["dir"] or "./checkpoints"))
        self.remote = open_mirror(settings, run_dir) if settings["mirror"] else None  # refused before any mkdir
        self.local = open_run_folder(settings["dir"] or "./checkpoints")
        self.run_dir = self.local.location.path
        self.node = node_of(settings)  # one of several nodes of a job: files of its own, one leader
        self.lock = RunLock(self.run_dir, wait_for_orphans_s=settings["grace"] + 10, name=self.node.file(LOCK_FILE))
        self.node_lock = NodesLock(self.run_dir) if self.node.name else None
        self.run_id = run_id_of(self.run_dir)
        self.policy = settings.restart_policy()
        self.machine = m.Machine(grace_s=settings["grace"])
        self.chooser = ResumeChooser(self.local, self.remote, settings.monitor, settings["upload_timeout"])
        self.notifier = Notifier()
        self.inbox = EventInbox(self.run_dir, self.node.file("events.sock"))
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.snapshots = SnapshotTaker(self.run_dir, self.local, self.node.name or "",
                                       enabled=bool(settings["shared_memory"]), wake=self.wake)
        self.output = WorkerOutput(self.run_dir, binary_stream("stdout"), binary_stream("stderr"),
                                   (self.node.file("worker.out"), self.node.file("worker.err")))
        self.mirror = (Mirror(self.local, self.remote, self.wake, settings["stale_after"], settings["upload_timeout"])
                       if self.remote else None)
        self.startup = Startup(self)
        self.house = Housekeeping(self)
        self.hang = HangWatch(settings["hang_timeout"], settings["hang_floor"])
        self.watcher = FolderWatcher(self.run_dir, self._folder_changed)
        self.preemption = (PreemptionWatcher(notice_source(settings["preemption"], settings["preemption_endpoint"]),
                                             settings["preemption_interval"], self._on_preemption_notice)
                           if settings["preemption"] else None)
        self.notices: collections.deque[Notice] = collections.deque()
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
        self.announced: dict[int, set[str]] = {}  # pid -> the signals it handles (from its hello)
        self.ranks = RankTable()  # the ranks of a torch.distributed job on this node (from their hellos)
        self._leading = False
        self.loaded_step: Optional[int] = None  # the checkpoint the current worker said it loaded
        self.resume_superseded = False  # the current worker committed past its resume source
        self.emergency_saved = False  # the current worker reported an emergency commit
        self.finished = False  # the current worker reported the end of training (its final commit done)
        self.set_aside: set[int] = set()  # not to be resumed from again by this daemon
        self.mirror_missing: list[int] = []
        self.reason = ""
        self._inbox_checked_at = time.monotonic()
        self._emergency_step: Optional[int] = None
        self._exit_reported = False
        self.progress: Optional[protocol.ProgressCell] = None
        self.decisions = Decisions(self)
        self.observer = Observer(self)  # attempts, history, metrics: what `status`, `report`, `history` show
        self.house.write_status("starting")

    @property
    def config(self) -> RunConfig:
        """The effective settings: the run's policy (stored, or the worker's own) under `savegame run`'s."""
        return self.startup.config

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        selector = self._selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ)
        selector.register(self.inbox.fileno(), selectors.EVENT_READ)
        try:
            self._start_up()
            while self.exit_code is None:
                self._tick()
                if self.exit_code is not None:
                    break
                selector.select(self._timeout())
                self._drain_wake_pipe()
        except OSError as exc:  # a config error, the disk (full, read-only), an odd file in the run folder
            error = exc if isinstance(exc, SavegameError) else run_error(exc)
            code = protocol.EXIT_CONFIG if isinstance(error, ConfigError) else protocol.EXIT_IO
            self._abort(str(error.strerror if isinstance(error, StorageError) and error.strerror else error), code)
            raise error from None
        except ConfigError as exc:
            self._abort(str(exc), protocol.EXIT_CONFIG)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must still give the worker its emergency checkpoint
            log.exception("internal error: %s", exc)
            self._abort(f"internal error: {exc}", protocol.EXIT_FAILED)
        finally:
            self._shutdown(selector)
        return self.exit_code

    def _start_up(self) -> None:
        self._install_signals()
        become_subreaper()
        self.output.start()
        self.startup.prepare()
        self.watcher.start()
        if self.is_leader:
            self._lead("the only node" if self.node.name is None else "given --leader")
        if self.preemption:
            self.preemption.start()
        log.info("run %s in %s%s", self.run_id, self.run_dir, f", mirrored to {self.remote.url}" if self.remote else "")
        self._perform(m.StartWorker(fallback=False))

    def _tick(self) -> None:
        self._check_inbox()
        self._take_signals()
        self._take_worker_events()
        self._check_worker_exit()
        self._check_timers()
        self._check_hang()
        while self.events and self.exit_code is None:
            self._apply(self.events.popleft())
        self.house.tick()
        self.observer.tick()

    def _check_inbox(self) -> None:
        """Every few seconds: the event socket is still there (a cleaner of old files may remove it)."""
        now = time.monotonic()
        if now - self._inbox_checked_at < INBOX_CHECK_S:
            return
        self._inbox_checked_at = now
        if self.inbox.lost():
            self._selector.unregister(self.inbox.fileno())
            self.inbox.rebind()
            self._selector.register(self.inbox.fileno(), selectors.EVENT_READ)

    def _timeout(self) -> float:
        deadlines = list(self.timers.values())
        if self.notifier.watchdog_interval_s:
            deadlines.append(self.house.watchdog_at + self.notifier.watchdog_interval_s)
        if self.hang.limit_s and self.machine.state == m.State.RUNNING and not self.snapshots.committing:
            # (while a commit is under way _check_hang waits: a deadline past would spin the loop; the
            # commit's end wakes it)
            deadlines.append(self.last_event_mono + self.hang.limit_s)
        soonest = min(deadlines, default=time.monotonic() + 1.0)
        return max(0.0, min(soonest - time.monotonic(), 1.0))

    def wake(self) -> None:
        """Called from other threads (mirror, folder watcher) to have the loop look again."""
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:
            pass
        self.house.dirty = True

    def pause(self, seconds: float) -> bool:
        """Wait outside the loop (start-up), awake to signals; True when a stop was requested."""
        selectors_ = selectors.DefaultSelector()
        selectors_.register(self._wake_r, selectors.EVENT_READ)
        try:
            selectors_.select(seconds)
        finally:
            selectors_.close()
        self._drain_wake_pipe()
        return self._stop_pending()

    def _stop_pending(self) -> bool:
        self._take_signals()
        return self.machine.stopping or any(isinstance(e, m.StopRequested) for e in self.events)

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
        for signum in (*STOP_SIGNALS, signal.SIGUSR1, signal.SIGCHLD, *self.decisions.signals()):
            signal.signal(signum, lambda num, frame: self.signals.append(num))

    def _on_preemption_notice(self, notice: Notice) -> None:
        """Called from the watcher thread: the VM is about to be taken away, or may be."""
        self.notices.append(notice)
        self.wake()

    def _take_signals(self) -> None:
        while self.notices:
            self.events.append(self.decisions.on_notice(self.notices.popleft()))
        while self.signals:
            signum = self.signals.popleft()
            preemption = self.decisions.on_signal(signum)
            if preemption is not None:
                self.events.append(preemption)
            elif signum in STOP_SIGNALS:
                self.events.append(m.StopRequested(STOP_SIGNALS[signal.Signals(signum)]))
            elif signum == signal.SIGUSR1:
                self.events.append(m.CheckpointRequested())

    def _accept_sender(self, pid: int, uid: int) -> bool:
        """Events count only from this user's processes that belong to the current worker."""
        return uid == os.getuid() and self.worker is not None and self.worker.owns(pid)

    def _take_worker_events(self) -> None:
        for event in self.inbox.drain(self._accept_sender):
            self._take_commits()  # the worker may have seen a commit done before it said this
            self._on_worker_event(event)
        self._take_commits()

    def _take_commits(self) -> None:
        """The hand-overs the committer thread has committed, as the worker's own `committed` events."""
        for committed in self.snapshots.finished():
            self._on_worker_event(committed)

    def _commit_handed_over(self) -> None:
        """Only the hand-overs (the daemon is going: nothing else it hears matters now)."""
        for committed in self.snapshots.drain():
            self._note_commit(committed)
        for event in self.inbox.drain(self._accept_sender):
            committed = self.snapshots.take(event) if event["event"] == protocol.EVENT_SNAPSHOT else None
            if committed is not None:
                self._note_commit(committed)

    def _on_worker_event(self, event: Mapping[str, Any]) -> None:
        if event["event"] == protocol.EVENT_SNAPSHOT:
            self.snapshots.submit(event)  # committed beside the loop; _take_commits() hears of it
            return
        self.last_event_mono = time.monotonic()
        self.hang.observe(event, self.last_event_mono)
        self.observer.worker_event(event)
        kind = event["event"]
        if kind == protocol.EVENT_HELLO:
            self._on_hello(event)
        self.ranks.note(event)
        if kind in HEARTBEAT_EVENTS:
            self.heartbeat = next_heartbeat(self.heartbeat, event, time.time())
        if kind in ("started", "resumed", protocol.EVENT_HELLO):
            # Loaded, not wanted, or training without ever calling restore() (hello comes after any
            # restore): its memory goes back before the worker's own segments take theirs.
            self.snapshots.release_kept()
        if kind in ("started", "resumed") and isinstance(event.get("policy"), dict):
            self.startup.adopt_worker_policy(event["policy"])
        if kind == "resumed" and number(event, "resumed_from") is not None:
            self.loaded_step = int(number(event, "resumed_from"))  # type: ignore[arg-type]
            if event.get("read_from") == "memory":
                log.info("the worker loaded step %d from the copy kept in shared memory", self.loaded_step)
        if kind == "committed":
            self._note_commit(event)
        elif kind == "finished":
            self.finished = True
        elif kind == "saving":
            self.notifier.extend_timeout(self.config["grace"] + self.config["mirror_deadline"] + 5)
        elif kind == "interval" and isinstance(event.get("why"), str):
            log.info("the worker saves every %.1fs now: %s", number(event, "seconds") or 0.0, event["why"][:500])
        elif kind == "bad-checkpoint":
            log.error("the worker could not load step %s: %s", event.get("step"), str(event.get("problem"))[:500])

    def _on_hello(self, event: Mapping[str, Any]) -> None:
        handles = event.get("handles")
        names = {h for h in handles if h in KNOWN_SIGNALS} if isinstance(handles, list) else set()
        pid = int(event["pid"])
        rank = self.ranks.hello(event)
        if pid not in self.announced:
            of = f", rank {rank.rank} of {rank.world_size}" if rank.world_size > 1 else ""
            log.info("worker process %d is ready (handles %s%s)", pid, ", ".join(sorted(names)) or "no signals", of)
        self.announced[pid] = names
        if self.ranks.hosts_rank0 and not self.is_leader:
            self._lead(f"it runs global rank 0 (pid {pid})")
        self.house.write_status()  # `savegame status` (and whoever waits on it) sees the worker ready at once

    @property
    def is_leader(self) -> bool:
        """Whether this daemon runs retention and the mirror (of several nodes' daemons, only one)."""
        return self.node.name is None or self.node.pinned_leader or self._leading

    def _lead(self, why: str) -> None:
        """Take on retention and the mirror (once; a job whose rank 0 moves keeps its first leader too)."""
        first = not self._leading
        self._leading = True
        if self.node.name is not None and first:
            log.info("node %s leads the run (retention, mirror): %s", self.node.name, why)
        if self.mirror and not self.startup.mirror_started:
            self.startup.mirror_started = True
            self.mirror.start()
        self.house.dirty = True

    def _inherited_fds(self) -> tuple[int, ...]:
        """The locks the worker inherits: the run folder stays held while any process of the run lives."""
        return (self.lock.fd,) + ((self.node_lock.fd,) if self.node_lock else ())

    def _note_commit(self, event: Mapping[str, Any]) -> None:
        if self.ranks.multi_rank and {k: self.last_checkpoint.get(k) for k in ("step", "reason")} == \
                {k: event.get(k) for k in ("step", "reason")}:
            return  # the same commit, told by another rank of the job
        self.last_checkpoint = {k: event.get(k) for k in ("step", "epoch", "reason", "path", "bytes", "metrics")}
        self.last_checkpoint["time"] = time.time()
        step = number(event, "step")
        urgent = event.get("reason") in ("emergency", "final") and step is not None
        if step is not None and self.resume_point is not None and step > self.resume_point.info.step:
            self.resume_superseded = True
        if urgent and event.get("reason") == "emergency":
            self._emergency_step = int(step)  # type: ignore[arg-type]
            self.emergency_saved = True
        self.house.dirty = True
        if self.mirror:
            self.mirror.request_sync(int(step) if urgent else None)  # type: ignore[arg-type]

    def _check_worker_exit(self) -> None:
        reap_children(self.worker)  # orphans of earlier workers too (the daemon is their subreaper)
        if self.worker is None or self._exit_reported:
            return
        status = self.worker.poll()
        if status is None:
            return
        self._take_worker_events()  # whatever it said before dying (its last commit, say)
        self.timers.pop("grace", None)  # it exited in time: no grace period runs out on it from here
        if self.snapshots.committing or self.snapshots.submit_unannounced():
            return  # handled once what it handed over is committed (the loop goes on meanwhile)
        self._exit_reported = True
        for committed in self.snapshots.worker_gone():  # made READY, killed before it could say so
            self._on_worker_event(committed)
        code, signum = status
        senders = self.ranks.senders()
        launcher = bool(senders) and self.worker.pid not in senders  # torchrun (or a wrapper), not a rank itself
        meant, note = self.ranks.translate(code, launcher) if signum is None else (code, "")
        step = self.progress.read() if self.progress else None
        self.events.append(m.WorkerExited(meant, signum, step, self.loaded_step, emergency_saved=self.emergency_saved,
                                          finished=self.finished,
                                          trained=bool(self.announced),
                                          note=f"{note}; the launcher exited {code}" if note else "",
                                          **self.decisions.worker_exited(meant, step)))
        self.house.collect_garbage()  # a dead worker's half-written checkpoint
        self.timers.pop("dump", None)
        self.house.dirty = True

    def _check_timers(self) -> None:
        now = time.monotonic()
        for name, deadline in list(self.timers.items()):
            if now >= deadline:
                del self.timers[name]
                self.events.append({"grace": m.GraceExpired(), "dump": m.DumpWaitOver(),
                                    "backoff": m.BackoffOver()}[name])

    def _check_hang(self) -> None:
        limit = self.hang.limit_s
        silent = time.monotonic() - self.last_event_mono
        if self.snapshots.committing:  # the worker may be waiting for this daemon's commit
            return
        if limit and self.machine.state == m.State.RUNNING and silent >= limit:
            self.events.append(m.HangDetected(silent))
            self.last_event_mono = time.monotonic()  # report a hang once

    # -- the one place state changes ------------------------------------------------------------

    def _apply(self, event: m.Event) -> None:
        t = m.transition(self.machine, event, time.monotonic(), self.policy)
        before, was_stopping = self.machine.state, self.machine.stopping
        self.decisions.transitioned(event, self.machine, t.machine)
        self.observer.transitioned(event, self.machine, t.machine)
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
        self.house.write_status(t.reason)

    def _perform(self, action: m.Action) -> None:
        if isinstance(action, m.StartWorker):
            self._start_worker(action.fallback)
        elif isinstance(action, m.SignalWorker) and self.worker is not None:
            self._signal_worker(action.signal)
        elif isinstance(action, m.KillGroup) and self.worker is not None:
            self.worker.kill_tree()
        elif isinstance(action, m.SetTimer):
            self.timers[action.name] = time.monotonic() + action.seconds
        elif isinstance(action, (m.QuarantineResume, m.SetAsideResume)) and self.resume_point is not None:
            step = self.resume_point.info.step
            self.set_aside.add(step)  # not fetched again from the mirror either
            if isinstance(action, m.QuarantineResume):
                self.chooser.quarantine(step, "the worker could not load it")
            else:
                log.error("setting step %d aside for this run: the worker kept dying right after loading it "
                          "(it stays on disk, verified; a later start may use it again)", step)
        elif isinstance(action, m.RollBack):
            self.decisions.roll_back(action.before_step)
        elif isinstance(action, m.Finish):
            self._finish(action.exit_code)
        elif isinstance(action, m.Requeue) and self.exit_code is not None:
            self.exit_code = self.decisions.requeue(self.exit_code)

    # -- actions ----------------------------------------------------------------------------------

    def _signal_worker(self, signum: int) -> None:
        """Stop and checkpoint requests go to the processes that announced they handle them."""
        assert self.worker is not None
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            targets = list(self.announced)  # the training process, even behind a wrapper
        else:
            targets = [pid for pid, handles in self.announced.items() if name in handles or signum == signal.SIGUSR2]
            if not targets:  # a process that does not handle it would die of it
                what = "checkpoint request" if signum == signal.SIGUSR1 else f"{name}"
                log.info("%s not sent: the worker has not announced that it takes it (yet)", what)
                return
        self.worker.send(signum, targets)

    def _start_worker(self, fallback: bool) -> None:
        if self.worker is not None and self.machine.failures:
            self.restarts[self.machine.failures[-1].cause] += 1
        self.resume_point = self.startup.choose_resume_point()
        if self._stop_pending():
            return  # a stop arrived while choosing: the StopRequested event ends the run
        self.startup.log_resume(fallback)
        self.attempt += 1
        progress_path = os.path.join(self.run_dir, STATUS_DIR, self.node.file("progress"))
        if self.progress is not None:
            self.progress.close()
        self.progress = protocol.ProgressCell(progress_path, create=True)
        env = worker_env(os.environ, self.run_dir, self.resume_point.info.path if self.resume_point else None,
                         self.run_id, self.attempt, self.inbox.address, self.startup.settings_path, progress_path)
        env.update(self.startup.launcher_env)
        env.update(self.snapshots.env(self.resume_point.info.step if self.resume_point else None))
        if self._stop_pending():
            return  # a stop arrived while preparing: the StopRequested event ends the run
        env = self.decisions.worker_env(env)
        try:
            self.worker = WorkerProcess(self.config["command"], env, keep_fds=self._inherited_fds(),
                                        stdout=self.output.fds[0], stderr=self.output.fds[1],
                                        oom_score_adj=self.config["worker_oom_score_adj"])
        except SpawnError as exc:
            self.events.append(m.SpawnFailed(str(exc.strerror), config_error=False))
            return
        self.lock.record(worker=self.worker.pgid)
        self.house.dirty = True  # retention looks again: a new resume source to protect
        self._exit_reported = False
        self.heartbeat, self.announced, self.loaded_step = {}, {}, None
        self.ranks.reset()
        self.resume_superseded = self.emergency_saved = self.finished = False
        self.last_event_mono = time.monotonic()
        self.hang.new_worker()
        self.events.append(m.Spawned(self.worker.pid))
        if self.attempt == 1:
            self.notifier.ready(f"running: worker pid {self.worker.pid}")

    def _finish(self, code: int) -> None:
        if self.mirror and self.startup.mirror_started:
            code = self._flush_mirror(code)
        self.decisions.approve()
        self.exit_code = code

    def _flush_mirror(self, code: int) -> int:
        """Every terminal state waits (within mirror_deadline) for the bucket to hold what it should;
        when it does not, the daemon says which steps are missing and does not exit 0."""
        assert self.mirror is not None and self.remote is not None
        deadline = self.config["mirror_deadline"]
        self.notifier.extend_timeout(deadline + 5)
        self.mirror.request_sync(self._emergency_step)
        with self.notifier.busy("waiting for the mirror to catch up"):
            missing = self.mirror.flush(deadline)
        if not missing:
            log.info("the mirror %s holds every checkpoint it should", self.remote.url)
            self.house.prune_local()  # what waited for the mirror's confirmation can go now
            self.mirror.store_records()  # the bucket's copy of the history tells of those deletions too
            return code
        self.mirror_missing = missing
        emergency = (f"; the emergency checkpoint (step {self._emergency_step}) is NOT in the mirror"
                     if self._emergency_step in missing else "")
        message = (f"the mirror {self.remote.url} does not hold steps {sorted(missing)} after {deadline:g}s"
                   f"{emergency}: they stay on local disk (last error: {self.mirror.last_error or 'none'})")
        log.error("%s", message)
        self.notifier.status(message)
        return protocol.EXIT_IO if code == protocol.EXIT_OK else code

    def _abort(self, reason: str, code: int) -> None:
        """The daemon cannot go on: the worker gets its emergency checkpoint, the mirror its flush."""
        self._emergency_exit()
        self._apply(m.Aborted(reason, code))

    def _emergency_exit(self) -> None:
        """The daemon itself failed: give the worker its emergency checkpoint before going."""
        if self.worker is None or self.worker.poll() is not None:
            return
        self._signal_worker(signal.SIGTERM)
        deadline = time.monotonic() + self.config["grace"]
        committing = self.snapshots.folder is not None  # its emergency save may be handed over: commit it
        while time.monotonic() < deadline and self.worker.poll() is None:
            if committing:
                try:
                    self._commit_handed_over()
                except Exception:  # noqa: BLE001 - the loop that failed may fail here too: just wait
                    log.exception("committing the worker's hand-over while stopping")
                    committing = False
            time.sleep(0.05)

    def _shutdown(self, selector: selectors.BaseSelector) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.kill_tree()  # never leave an orphan behind
        self.watcher.stop()
        if self.preemption:
            self.preemption.stop()
        if self.mirror:
            self.mirror.close()
        self.output.close()
        self.observer.close(self.exit_code)
        self.house.write_status()
        for signum in STOP_SIGNALS:  # the run is over: a late stop signal must not kill the exit (as -15)
            signal.signal(signum, signal.SIG_IGN)
        signal.set_wakeup_fd(-1)
        selector.close()
        self.inbox.close()
        self.snapshots.close()
