"""The Checkpointer: the one object a training script creates.

    ckpt = Checkpointer(args.dir, monitor="val_acc", mode="max")
    ckpt.track(model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt.restore()                              # resumes if there is a checkpoint
    for epoch in ckpt.epochs(args.epochs):
        for x, y in ckpt.batches(loader):       # resumes at the next batch; step boundaries
            train_step(x, y)
        ckpt.end_epoch(val_acc=evaluate())
    ckpt.finish()

At each step boundary it follows the save schedule, answers stop requests (SIGTERM: save, exit
75) and checkpoint-now requests (SIGUSR1), and reports heartbeats to the daemon when there is one.
Saving copies state into host buffers on this thread; writing and committing happen in the
background. Without a daemon it also applies retention itself.
"""
from __future__ import annotations

import logging
import math
import os
import time
import uuid
from typing import Any, ContextManager, Iterable, Iterator, Mapping, Optional, Union

from savegame import protocol
from savegame.config import explicit_for_worker
from savegame.errors import ConfigError, CorruptCheckpoint, StorageError
from savegame.see.history import record_commit
from savegame.snapshot.kept import KeptSnapshot
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.strategies import History, Moment, is_better, next_history
from savegame.worker.adapter import STATE_FORMAT, Adapter, CheckpointReader
from savegame.worker.cadence import AutoCadence
from savegame.worker.codec import Encoder, decode
from savegame.worker.commits import Commits, apply_retention
from savegame.worker import exits
from savegame.worker.exits import exit_config, exit_io, protect_output, say, say_now
from savegame.worker.guard import LossGuard
from savegame.worker.handover import HandoverWriter
from savegame.worker.link import HEARTBEAT_INTERVAL_S, DaemonLink
from savegame.worker.narrate import Narrator
from savegame.worker.progress import Progress, rng_state, set_rng_state
from savegame.worker.registry import make_adapter
from savegame.worker.rollback import batches_to_skip, roll_back
from savegame.worker.settings import choose_dir, load_config, positive_int, resume_sources, stored_policy
from savegame.worker.signals import StopRequests
from savegame.worker.writer import BackgroundWriter, SaveJob

log = logging.getLogger("savegame.worker")
MAX_FAILED_SAVES = 3
__all__ = ["Checkpointer", "HEARTBEAT_INTERVAL_S"]


class Checkpointer:
    def __init__(self, dir: Optional[str] = None, *, monitor: Optional[str] = None, mode: str = "auto",
                 regime: Optional[str] = None, every_steps: Optional[int] = None,
                 every_epochs: Optional[int] = None, every_seconds: Optional[Union[float, str]] = None,
                 keep_last: Optional[int] = None, keep_best: Optional[int] = None,
                 min_delta: Optional[float] = None, framework: Optional[str] = None,
                 handle_signals: bool = True, initial_best: Optional[float] = None,
                 steps_per_epoch: Optional[int] = None, verbose: int = 1,
                 defaults: Optional[Mapping[str, Any]] = None,
                 rollback: Optional[Mapping[str, Any]] = None) -> None:
        self._link = DaemonLink(self._status)
        self.supervised = self._link.supervised
        exits.on_exit = lambda code, line: self._link.send("exiting", code=code, error=line[:500])
        if self.supervised:
            protect_output()  # a full disk under the daemon's output files must not kill training
        try:
            self.dir = choose_dir(dir)
            stored = stored_policy(self.dir, self.supervised)
            self.config = load_config(locals(), stored, defaults)
            # Steps per epoch, when known (batches() takes it from len(loader)). Without it a periodic
            # save due at a step that may end the epoch waits for the next boundary (see _defer).
            self.epoch_length: Optional[int] = positive_int("steps_per_epoch", steps_per_epoch)
        except ConfigError as exc:
            exit_config(exc)
        self.store = CheckpointStore(self.dir)
        self.run_id = os.environ.get(protocol.ENV_RUN_ID) or uuid.uuid4().hex[:12]
        self.progress = Progress()
        self.state: dict[str, Any] = {}  # the script's own counters; saved and restored as JSON
        self.resumed_from: Optional[int] = None
        self.metrics: dict[str, float] = {}
        self._framework = framework
        self._adapter: Optional[Adapter] = None
        self._schedule = self.config.schedule()
        self._guard = LossGuard(self.config.rollback_rule(), batches_to_skip(self.dir))
        self._cadence = (AutoCadence(self.config["save"]["mtbf_prior"], self._interval_changed)
                         if self.config.auto_interval else None)
        self._initial_best = initial_best  # a best to beat before anything counts as "best" (Keras' initial_value_threshold)
        self._history = History(last_time=time.monotonic(), best=initial_best)
        self._requests = StopRequests()
        self.narrator = Narrator(verbose)
        self._handle_signals = handle_signals
        self._training = False  # signals are taken over at the first training call, not before
        self._lock_fd: Optional[int] = None  # the run folder's lock, held while training on its own
        if not self.supervised:  # at a terminal: say at once what Ctrl-C does
            self._requests.on_interrupt = lambda: say_now("interrupted: saving a checkpoint at the next step; "
                                                          "press Ctrl-C again to quit at once")
        self._commits = Commits(self._link, self._committed, lambda: self._writer.last_persist_s)
        self._stall = [0.0, 0]  # seconds the training thread spent in saves, and how many (told to the daemon)
        self._writer = self._make_writer()
        self._resume_mid_epoch = False
        self._agreement: Any = None  # the ranks of a torch.distributed job: decisions every rank takes alike
        self._epoch_open = False
        self._deferred: Optional[str] = None  # a periodic save put off to the next boundary
        # True once the script works in epochs (epochs(), batches(), end_epoch(), the Keras callback): a
        # periodic save is only put off for an epoch end then; a plain step loop saves at exact steps.
        self.uses_epochs = False
        self._announced = False  # "started" or "resumed" sent: the daemon has the script's settings

    # -- set-up ---------------------------------------------------------------------------------

    def _make_writer(self) -> Union[BackgroundWriter, HandoverWriter]:
        """Under a daemon that offers shared memory, saves are handed over to it; else written here."""
        folder = os.environ.get(protocol.ENV_SEGMENTS, "") if self.supervised else ""
        if folder and os.path.isdir(folder):
            return HandoverWriter(self.store, folder, self._link, self._commits.done,
                                  self._commits.committed_by_daemon, stopping=lambda: self._requests.stop)
        return BackgroundWriter(self.store, self._commits.done)

    def track(self, **objects: Any) -> "Checkpointer":
        """Register what to save: model=, optimizer=, scheduler=, scaler=, sampler=, ... (any names)."""
        if self._adapter is None:
            try:
                self._adapter = make_adapter(self._framework, objects)
            except ConfigError as exc:
                exit_config(exc)
            bind = getattr(self._adapter, "bind", None)
            if bind is not None:
                bind(self)  # adapters that save the step counter read self.progress at capture time
            agreement = getattr(self._adapter, "agreement", None)
            if agreement is not None:
                self._agreement = agreement(self._schedule)
        self._adapter.add(**objects)  # type: ignore[attr-defined]
        return self

    @property
    def adapter(self) -> Optional[Adapter]:
        """The framework adapter track() chose (None before the first track())."""
        return self._adapter

    @property
    def framework(self) -> str:
        return self._adapter.framework if self._adapter else "none"

    # -- resume ---------------------------------------------------------------------------------

    def restore(self) -> Optional[CheckpointInfo]:
        """Load the checkpoint to resume from, if any. Returns it, or None for a fresh start."""
        sources = resume_sources(self.store, self.config, self.supervised)
        agree_resume = getattr(self._adapter, "agree_resume", None)
        if agree_resume is not None:  # the ranks of a job: all from the same step, or all fresh
            agree_resume(sources[0][1].step if sources else None)
        memory = self._kept_snapshot()
        try:
            for store, info in sources:
                try:
                    where = self._load_from(store, info, memory)
                except ConfigError as exc:  # the checkpoint is fine, the script does not fit it
                    exit_config(exc)
                except (CorruptCheckpoint, ValueError) as exc:  # ValueError: malformed contents
                    if self.supervised:
                        log.error("cannot resume from %s: %s", info.path, exc)
                        self._link.send("bad-checkpoint", step=info.step, problem=str(exc))
                        raise SystemExit(protocol.EXIT_BAD_CHECKPOINT) from None
                    log.error("cannot resume from %s (%s); trying the one before it", info.path, exc)
                    continue
                log.info("resumed from step %d (epoch %d, %s) at %s%s", info.step, info.epoch, info.reason, info.path,
                         " (read from shared memory)" if where == "memory" else "")
                self.narrator.resumed(info.step, self.progress.epoch, self.progress.batch_in_epoch,
                                      self._monitor_name, self.best)
                self._announced = True
                self._report("resumed", policy=explicit_for_worker(self.config), read_from=where)
                return info
        finally:
            if memory is not None:
                memory.close()
        if getattr(self._adapter, "live_state_damaged", False):
            raise CorruptCheckpoint(f"no checkpoint in {self.dir} could be loaded, and a damaged one was already "
                                    "partly read into the model, so it cannot start from scratch either; move the "
                                    f"damaged checkpoints away (see `savegame verify {self.dir}`) and start again")
        self._announced = True
        self._report("started", policy=explicit_for_worker(self.config))
        return None

    def _kept_snapshot(self) -> Optional[KeptSnapshot]:
        """The checkpoint the daemon kept in shared memory for this restart, if it offered one."""
        path = os.environ.get(protocol.ENV_RESTORE_SEGMENT, "") if self.supervised else ""
        return KeptSnapshot.open(path) if path else None

    def _load_from(self, store: CheckpointStore, info: CheckpointInfo, memory: Optional[KeptSnapshot]) -> str:
        """Load `info`, from its copy in shared memory when that is kept; where it was read ("memory", "disk")."""
        if memory is not None and memory.step == info.step:
            try:
                if self._load(store, info, memory):
                    return "memory"
                return "disk"
            except (CorruptCheckpoint, ValueError, OSError) as exc:  # the copy, not the checkpoint, is bad
                log.warning("the copy of step %d kept in shared memory does not match its checkpoint (%s): "
                            "reading it from disk", info.step, exc)
        self._load(store, info)
        return "disk"

    def _load(self, store: CheckpointStore, info: CheckpointInfo, memory: Optional[KeptSnapshot] = None) -> bool:
        """Load `info` into the tracked objects; True when its files came from shared memory."""
        reader = CheckpointReader(store, info, memory)
        if self._adapter is not None:
            self._adapter.restore(reader)
        core = reader.state  # after the adapter's restore: a rank of a job reads its own part
        self.progress = Progress.from_json(core["progress"])
        self.state = decode(core.get("user", {"__dict__": {}}), _no_tensors)
        best = core.get("history", {}).get("best")
        self._guard.load(core.get("history", {}).get("losses"))
        if self._cadence is not None:
            self._cadence.load(core.get("history", {}).get("save_cost"))
        monitor = self.config.monitor
        if self._initial_best is not None and monitor and is_better(self._initial_best, best, monitor[1]):
            best = self._initial_best
        self._history = History(last_step=info.step, last_time=time.monotonic(), best=best)
        set_rng_state(core.get("rng", {}))
        self.resumed_from = info.step
        self._commits.step = info.step
        self._resume_mid_epoch = self.progress.batch_in_epoch > 0
        return reader.from_memory

    # -- the training loop ----------------------------------------------------------------------

    def start_training(self) -> None:
        """Called by the first training call (epochs(), batches(), step(), end_epoch(), the Keras
        callback's on_train_begin): take over the stop signals and announce this process to the daemon.
        Until then a script that only loads weights keeps its own signal handling."""
        if self._training:
            return
        self._training = True
        handles = self._requests.install() if self._handle_signals else []
        if self.supervised:
            self._link.hello(handles)  # the daemon's lock, inherited, keeps other writers off the folder
            if not self._announced:
                self._started_without_restore()
        elif self._coordinator():  # of a job's ranks, rank 0 holds the folder and stores the policy
            self._lock_fd = self._lock_folder()
            self._store_policy()
        if self._cadence is not None:
            self._reschedule(self._cadence.update())  # from the costs a resumed checkpoint brought, if any

    def _started_without_restore(self) -> None:
        """The script trains without having called restore(): the daemon still needs its settings (no
        retention runs without them: the disk would fill), and the user to hear of the skipped resume."""
        chosen = os.environ.get(protocol.ENV_RESUME_FROM, "")
        if chosen:
            say(f"this script does not call restore() before training, so it starts from scratch "
                f"although {chosen} could be resumed from; call ckpt.restore() after ckpt.track(...)")
        self._report("started", policy=explicit_for_worker(self.config))

    def _coordinator(self) -> bool:
        """This process alone, or rank 0 of a torch.distributed job."""
        return getattr(getattr(self._adapter, "job", None), "rank", 0) == 0

    def _lock_folder(self) -> Optional[int]:
        """One writer per run folder: on its own, the script holds the folder's lock while it trains."""
        if not self.store.is_local:
            return None
        from savegame.daemon.rundir import lock_for_standalone_writer

        try:
            return lock_for_standalone_writer(self.store.location.path)
        except ConfigError as exc:
            exit_config(exc)

    def _store_policy(self) -> None:
        """On its own, the run's policy goes with its checkpoints, for `ls`, `prune`, `restore --best`
        and a later daemon (under a daemon, the daemon stores it)."""
        from savegame.policy import update_policy

        try:
            update_policy(self.store, self.config)
        except StorageError as exc:
            log.warning("%s", exc)

    def epochs(self, total: int) -> Iterator[int]:
        """Epoch indices from where the run stands to `total` - 1."""
        self.start_training()
        self.uses_epochs = True
        while self.progress.epoch < total:
            self._epoch_open = True
            yield self.progress.epoch
            if self._epoch_open:
                self.end_epoch()

    def batches(self, loader: Iterable[Any]) -> Iterator[Any]:
        """Iterate a loader from the resume position; each batch's end is a step boundary."""
        self.start_training()
        self.uses_epochs = True
        skip = self.progress.batch_in_epoch if self._resume_mid_epoch else 0
        try:
            self.epoch_length = len(loader)  # type: ignore[arg-type]  # the full epoch: not yet fast-forwarded
        except TypeError:
            pass  # a loader without a length: steps_per_epoch, if given, still holds
        prepare = getattr(self._adapter, "prepare_loader", None)
        iterator, skipped = (prepare(loader, self.progress.epoch, skip, self._resume_mid_epoch)
                             if prepare else (iter(loader), 0))
        self._resume_mid_epoch = False
        for _ in range(skip - skipped):
            next(iterator)  # a loader we cannot fast-forward: consume the batches already trained
        for batch in iterator:
            if self.skip_batch():
                continue
            yield batch
            self.step()

    def step(self, **metrics: float) -> None:
        """A step boundary: count the step, then save, stop or report as needed."""
        self.start_training()
        self.progress.step += 1
        self.progress.batch_in_epoch += 1
        self._boundary(Moment(self.progress.step, self.progress.epoch, time.monotonic(), False, metrics))

    def end_epoch(self, **metrics: float) -> None:
        """An epoch boundary, with the epoch's validation metrics (they go into the manifest)."""
        self.start_training()
        self.uses_epochs = True
        self._epoch_open = False
        self.progress.epoch += 1
        self.progress.batch_in_epoch = 0
        self.metrics = {k: float(v) for k, v in metrics.items()}
        if self._monitor_name and self._monitor_name not in self.metrics:
            self.narrator.missing_metric(self._monitor_name, self.progress.epoch, self.metrics)
        self._boundary(Moment(self.progress.step, self.progress.epoch, time.monotonic(), True, self.metrics))

    def _boundary(self, moment: Moment) -> None:
        self._link.boundary(moment.step)
        self._check_loss()
        if self._link.gone and not self._requests.stop:  # killed (-9): nobody would stop or restart this worker
            log.error("the daemon is gone (nobody reads %s): saving an emergency checkpoint and exiting 75; "
                      "`savegame run` resumes from it", self._link.address)
            self._requests.stop = True
        stop = self._requests.stop
        if self._agreement is not None:  # several ranks: every one stops, or saves, at the same step
            stop, reason = self._agreement.decide(moment, self._history, stop, self._requests.take_checkpoint())
        else:
            reason = None if stop else ("manual" if self._requests.take_checkpoint()
                                        else self._schedule.due(moment, self._history))
        reason = self._defer(reason, moment)
        monitor = self.config.monitor
        before = self._history.best
        # Update the history first: the checkpoint saved here must hold this boundary's best value.
        self._history = next_history(self._history, moment, stop or bool(reason), *(monitor or (None, "max")),
                                     self.config["save"]["min_delta"])
        if moment.at_epoch_end:
            self.narrator.epoch_end(moment.epoch, self._monitor_name, before, self._history.best,
                                    (moment.step, reason) if reason and not stop else None)
        if stop:
            self._stop(moment)
        if reason:
            self._save(reason, moment.metrics)
        if self._agreement is not None and not moment.at_epoch_end:
            self._agreement.launch(saved=bool(reason))

    def _defer(self, reason: Optional[str], moment: Moment) -> Optional[str]:
        """A periodic save due at a step that may be the epoch's last (unknown epoch length, or the
        last batch) waits one boundary: an end_epoch() at this step then saves it with the epoch's
        metrics (as "best" when it improved); otherwise the next step saves. Deferred once only."""
        deferred, self._deferred = self._deferred, None
        if deferred is None and reason == "periodic" and not moment.at_epoch_end and self.uses_epochs \
                and (self.epoch_length is None or self.progress.batch_in_epoch >= self.epoch_length):
            self._deferred = reason
            return None
        return reason or deferred

    def heartbeat(self) -> bool:
        """Tell the daemon this worker is alive (rate-limited; a no-op without a daemon). True if sent."""
        return self._link.heartbeat()

    def keepalive(self, activity: str = "busy") -> ContextManager[None]:
        """Heartbeats every HEARTBEAT_INTERVAL_S from a helper thread while the block runs, so a long
        evaluation is not taken for a hang (`--hang-timeout`):

            with ckpt.keepalive("evaluating"):
                val_acc = evaluate(model)
        """
        return self._link.keepalive(activity)

    def report(self, loss: Any) -> None:
        """The training loss of the batch being trained (call it before step()). With `[rollback]` on,
        a NaN/inf loss or a spike rolls the run back at the next boundary, before anything is saved."""
        self._guard.report(loss, self.progress.step, self.progress.epoch, self.progress.batch_in_epoch)

    def skip_batch(self) -> bool:
        """For loops that fetch their own data: True when the batch at this position produced an
        anomaly earlier and is to be stepped over (then it counts as consumed, not as a step)."""
        if not self._guard.skips(self.progress.epoch, self.progress.batch_in_epoch):
            return False
        log.warning("skipping batch %d of epoch %d: it made the loss go bad before", self.progress.batch_in_epoch,
                    self.progress.epoch)
        self.progress.batch_in_epoch += 1
        return True

    @property
    def best(self) -> Optional[float]:
        """The best value of the monitored metric so far (survives resumes)."""
        return self._history.best

    @property
    def _monitor_name(self) -> Optional[str]:
        return self.config.monitor[0] if self.config.monitor else None

    @property
    def should_stop(self) -> bool:
        """True once a stop was requested (SIGTERM, Ctrl-C): a loop that does not go through step()
        may check it, save and exit 75 itself."""
        return self._requests.stop

    # -- saving ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Block until the save in flight (if any) is committed or has failed."""
        self._writer.wait()

    def save(self, reason: str = "manual", wait: bool = False) -> None:
        """Save now (at a step boundary). `wait=True` returns only once it is committed."""
        self._check_loss()
        self._save(reason, self.metrics if self.progress.batch_in_epoch == 0 else {})
        if wait:
            self._writer.wait()

    def _save(self, reason: str, metrics: Mapping[str, float], in_place: bool = False) -> None:
        """Capture and hand to the writer. `in_place`: the caller waits for the commit before training
        could change anything (emergency, final), so adapters may write straight from live memory."""
        began, saved = time.monotonic(), False
        try:
            saved = self._save_now(reason, metrics, in_place)
        finally:
            self._stall = [self._stall[0] + time.monotonic() - began, self._stall[1] + saved]

    def _save_now(self, reason: str, metrics: Mapping[str, float], in_place: bool) -> bool:
        step = self.progress.step
        if step == self._writer.inflight_step:
            self._writer.wait()  # the same state is being written: wait, and retry only if it failed
        if step == self._commits.step:
            return False  # this exact state is already committed
        if self._adapter is None:
            exit_config(ConfigError("nothing to save: call ckpt.track(model=..., optimizer=...) first"))
        self._writer.make_room()  # back-pressure: the buffers are free once the last save is out of them
        if self._commits.failures >= MAX_FAILED_SAVES:
            self.close()
            exit_io(f"{self._commits.failures} checkpoints in a row failed to save; stopping rather than training "
                    f"on without a way back: {self._commits.error}")
        self._deferred = None  # whatever was put off is in this save
        capture_in_place = getattr(self._adapter, "capture_in_place", None) if in_place else None
        capture_into = getattr(self._adapter, "capture_into", None)
        reserve = getattr(self._writer, "reserve", None)  # the hand-over lends a segment to copy into
        started = time.monotonic()
        if capture_in_place is None and capture_into is not None and reserve is not None:
            capture = capture_into(lambda specs: reserve(specs, step))  # may wait for a free segment
        else:
            capture = (capture_in_place or self._adapter.capture)()
        self._writer.submit(SaveJob(capture, self._core_state(), step, self.progress.epoch, reason, dict(metrics),
                                    self.framework, self.run_id, self.resumed_from))
        if capture.fill is not None:
            capture.fill()  # the copy, while the writer already writes what is copied
        if self._cadence is not None and not in_place:  # emergency and final saves wait for the disk on purpose
            self._reschedule(self._cadence.measured(time.monotonic() - started, self._writer.last_persist_s))
        return True

    def _check_loss(self) -> None:
        """A bad loss was reported: roll back before this state can be saved (exits 76)."""
        if self._guard.pending is not None:
            roll_back(self, self._guard.pending)

    def _reschedule(self, seconds: Optional[float]) -> None:
        if seconds is not None:
            self._schedule = self.config.schedule(auto_seconds=seconds)

    def _interval_changed(self, interval: Any) -> None:
        log.info("save interval: %.1fs: %s", interval.seconds, interval.why)
        self._link.send("interval", seconds=interval.seconds, why=interval.why)

    def _core_state(self) -> dict[str, Any]:
        return {"format": STATE_FORMAT, "progress": self.progress.to_json(), "rng": rng_state(),
                "user": Encoder(lambda _: False).encode(self.state, "user"),
                "history": {"best": self._history.best, "losses": self._guard.state(),
                            "save_cost": self._cadence.state() if self._cadence else None},
                "uses_epochs": self.uses_epochs}

    def _committed(self, info: CheckpointInfo) -> None:
        if not self.supervised and self._coordinator():
            # the daemon applies retention to what it supervises; of a job's ranks, rank 0 does.
            # The resume source is protected until a newer checkpoint stands in for it.
            record_commit(self.store, info, self._writer.last_persist_s)  # the run's history (savegame history)
            superseded = self.resumed_from is not None and info.step > self.resumed_from
            apply_retention(self.store, self.config, None if superseded else self.resumed_from)

    # -- stopping -------------------------------------------------------------------------------

    def _stop(self, moment: Moment) -> None:
        """Emergency: commit this step's state (unless it already is), then exit 75."""
        self._link.send("saving", step=moment.step, reason="emergency")
        self._commit_now("emergency", moment.metrics if moment.at_epoch_end else {})
        self.narrator.saved(moment.step, "emergency")
        # "agreed": another rank of the job (maybe on another node) asked, not this one
        self._report("stopping", why="requested" if self._requests.stop else "agreed")
        self._leave_job()
        self.close()
        if self._requests.interrupted and not self.supervised:
            say(f"interrupted: saved step {moment.step} (emergency); run again to resume")
        raise SystemExit(protocol.EXIT_SAVED_RESUME_ME)

    def finish(self) -> None:
        """End of training: commit the final state, wait for it, tell the daemon. A final state that
        cannot be committed (a full disk) ends the process with exit 74, not a silent success."""
        if self._agreement is not None:
            self._agreement.drain()
        self._check_loss()
        self._commit_now("final", self.metrics)
        self._report("finished")
        self._leave_job()
        self.close()

    def _commit_now(self, reason: str, metrics: Mapping[str, float]) -> None:
        """Save this step from live memory and wait for the commit; exit 74 when it did not reach the disk."""
        self._save(reason, metrics, in_place=True)
        self._writer.wait()
        error = self._commits.error
        if self._commits.step != self.progress.step and error is not None:
            self.close()
            exit_io(f"the {reason} checkpoint (step {self.progress.step}) was not saved: {error}")

    def _leave_job(self) -> None:
        """Every rank of a job is here together (final or emergency commit): let the job's checkpoint
        groups go now rather than in the script's own teardown."""
        leave = getattr(self._adapter, "leave_job", None)
        if leave is not None:
            self._writer.wait()
            leave()

    def close(self) -> None:
        """Wait for the save in flight, give the signal handlers back, stop reporting."""
        self._writer.close()
        self._requests.restore()
        self._link.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the folder is free for the next writer
            self._lock_fd = None

    def _status(self) -> dict[str, Any]:
        best = self._history.best
        return {"step": self.progress.step, "epoch": self.progress.epoch, "resumed_from": self.resumed_from,
                "monitor": self._monitor_name, "best": best if best is not None and math.isfinite(best) else None,
                "stall_s": round(self._stall[0], 4), "saves": self._stall[1]}

    def _report(self, event: str, **extra: Any) -> None:
        self._link.report(event, **extra)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _no_tensors(name: str) -> Any:
    raise CorruptCheckpoint(f"unexpected tensor {name!r} in the script's state")
