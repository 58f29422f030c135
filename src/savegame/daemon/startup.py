"""The daemon's start-up and the run's policy: what to resume from, and what "best" means.

- The run's policy is known once it is read from storage (the run folder's record, else the
  bucket's) or once the worker reports its own Checkpointer settings; until then no retention
  runs. Whenever it is settled or changes, it is stored with the checkpoints.
- A resume is chosen among local and mirrored checkpoints. A run folder that is empty while the
  mirror cannot be read is not a fresh start: the daemon retries (telling systemd) for up to
  `mirror_wait`, then gives up with a clear message rather than fork the run.
"""
from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional

from savegame.config import Layer, RunConfig, build_config, explicit_for_worker
from savegame.daemon.deadline import with_deadline
from savegame.daemon.process import check_command
from savegame.daemon.resume import LIST_TIMEOUT_S, QUICK_LIST_S, MirrorUnreachable, ResumePoint
from savegame.daemon.status import write_worker_settings
from savegame.daemon.torchrun import check_torchrun
from savegame.errors import ConfigError, StorageError
from savegame.policy import read_policy, update_policy

if TYPE_CHECKING:
    from savegame.daemon.supervisor import Supervisor

log = logging.getLogger("savegame")
MIRROR_RETRY_MAX_S = 30.0


class Startup:
    def __init__(self, daemon: "Supervisor") -> None:
        self.daemon = daemon
        self.config: RunConfig = daemon.settings
        self.policy_known = False
        self.settings_path = ""
        self.mirror_started = False
        self.launcher_env: dict[str, str] = {}  # added to the worker's environment (torchrun's settings)
        self._remote_wait_s = LIST_TIMEOUT_S  # shorter once local checkpoints could serve the resume
        self._stored_layer: Optional[Layer] = None  # the run's policy as found in storage at start

    # -- before the first worker ------------------------------------------------------------------

    def prepare(self) -> None:
        d = self.daemon
        check_command(d.settings["command"], os.environ)
        self.launcher_env = check_torchrun(d.settings["command"], os.environ, d.settings["grace"])
        self.settings_path = write_worker_settings(d.run_dir, explicit_for_worker(d.settings),
                                                   d.node.file("settings.json"))
        d.house.collect_garbage()
        if d.local.list():
            self._remote_wait_s = QUICK_LIST_S
        self._check_mirror()
        self._adopt_stored_policy()
        if d.settings["resume"] == "none":
            self._refuse_to_mix_runs()

    def _check_mirror(self) -> None:
        """A bucket that does not exist is a configuration error; one that cannot be reached now is
        not (the network may not be up yet): the mirror retries, and the resume choice waits for it."""
        remote = self.daemon.remote
        if remote is None or remote.is_local:
            return
        try:
            with self.daemon.notifier.busy(f"reaching the mirror {remote.url}"):
                exists = with_deadline(remote.exists, self._remote_wait_s, f"reaching {remote.url}")
        except StorageError as exc:
            log.warning("the mirror %s is not reachable now (%s); it will be retried", remote.url, exc.strerror or exc)
            return
        if not exists:
            raise ConfigError(f"the mirror {remote.url} does not exist: create the bucket first")

    def _adopt_stored_policy(self) -> None:
        d = self.daemon
        layer = read_policy(d.local)
        if layer is None and d.remote is not None:
            remote = d.remote
            try:
                layer = with_deadline(lambda: read_policy(remote), self._remote_wait_s,
                                      f"reading {remote.url}'s policy")
            except StorageError as exc:
                log.warning("cannot read the run's policy from the mirror (%s)", exc)
        if layer is None:
            log.info("the run's policy is not stored yet: no retention until the worker reports its settings")
            return
        self._stored_layer = layer
        self._settle([], "the run's stored policy")

    def _refuse_to_mix_runs(self) -> None:
        """--resume none over an earlier run's checkpoints would put two runs in one folder."""
        d = self.daemon
        steps = [c.step for c in d.local.list()]
        where = d.run_dir
        if not steps and d.remote is not None:
            remote = d.remote
            try:
                steps = [c.step for c in with_deadline(remote.list, LIST_TIMEOUT_S, f"listing {remote.url}")]
                where = remote.url
            except StorageError as exc:  # its retention could delete an earlier run's checkpoints there
                raise StorageError(exc.errno or 5, f"--resume none: cannot check that the mirror {remote.url} holds "
                                   f"no earlier run ({exc.strerror or exc}); start again once it can be read") from None
        if steps:
            shown = f"{steps[0]}..{steps[-1]}" if len(steps) > 1 else str(steps[0])
            raise ConfigError(f"{where} already holds checkpoints of an earlier run (steps {shown}); --resume none "
                              "would put two runs in one place: give a new --dir (and --mirror), or move the old "
                              "checkpoints away, or drop --resume none to continue that run (`resume = \"none\"` in "
                              "a config file refuses every restart of a run: give --resume none for a one-off start)")

    # -- the policy -------------------------------------------------------------------------------

    def adopt_worker_policy(self, policy: Mapping[str, Any]) -> None:
        """The script's own Checkpointer settings (its monitored metric, what it keeps) apply to
        retention here too; what was given to `savegame run` still wins."""
        self._settle([Layer("the worker's Checkpointer settings", policy)], "the worker's settings")

    def _settle(self, lower: list[Layer], source: str) -> None:
        """The effective settings: the run's stored policy (lowest: what it does not say again stays as
        stored), then `lower` (the worker's own settings), then what `savegame run` was given."""
        d = self.daemon
        stored = [self._stored_layer] if self._stored_layer is not None else []
        try:
            config = build_config([*stored, *lower, Layer("savegame run settings", d.settings.explicit)])
        except ConfigError as exc:
            log.warning("ignoring %s: %s", source, exc)
            return
        changed = config.values != self.config.values or not self.policy_known
        self.config, self.policy_known = config, True
        d.policy = config.restart_policy()  # the script's [rollback] max counts here too
        if not changed:
            return
        d.chooser.monitor = config.monitor
        if config.monitor:
            log.info("retention follows %s: monitor %s (%s)", source, *config.monitor)
        try:
            update_policy(d.local, config)
        except StorageError as exc:
            log.warning("%s", exc)
        if d.mirror:
            d.mirror.set_config(config)
        d.house.dirty = True

    # -- the resume choice ------------------------------------------------------------------------

    def choose_resume_point(self) -> Optional[ResumePoint]:
        """What the next worker resumes from (None: a fresh start, or a stop arrived meanwhile)."""
        d = self.daemon
        if d.attempt == 0 and d.settings["resume"] == "none":
            return None
        choice = "latest" if d.settings["resume"] == "none" else self.config["resume"]  # a restart continues
        before, d.decisions.rollback_before = d.decisions.rollback_before, None
        if before is not None:
            choice = "latest"  # a rollback resumes from the newest checkpoint before the bad loss
        give_up_at = time.monotonic() + self.config["mirror_wait"]
        delay = 1.0
        while True:
            try:
                with d.notifier.busy("choosing and verifying the checkpoint to resume from"):
                    point = d.chooser.choose(choice, exclude=d.set_aside, before=before)
                if point is not None and choice == "best":
                    self._supersede_newer(point.info.step)
                return point
            except MirrorUnreachable as exc:
                if time.monotonic() + delay > give_up_at:
                    raise MirrorUnreachable(f"{exc}; gave up after waiting {self.config['mirror_wait']:g}s "
                                            "(mirror_wait). Not starting fresh: that would fork the run. Check the "
                                            "network and the credentials, or start over with --resume none") from None
                log.warning("%s; not starting fresh: retrying in %gs", exc, delay)
                d.notifier.status(f"waiting for the mirror: {exc}")
                d.notifier.extend_timeout(delay + 2 * LIST_TIMEOUT_S)
                d.notifier.watchdog()
                if d.pause(delay):
                    return None
                delay = min(delay * 2, MIRROR_RETRY_MAX_S)

    def _supersede_newer(self, step: int) -> None:
        """Resuming from the best, older than the newest, starts a new timeline from it: the newer
        checkpoints are set aside (moved to .quarantine/, locally and in the bucket; never deleted), so
        "latest" means the new timeline and its steps are free for it."""
        d = self.daemon
        why = f"superseded: the run resumed from step {step} (resume = best), a new timeline from there"
        stores = [d.local] + ([d.remote] if d.remote is not None else [])
        for store in stores:
            try:
                newer = [c.step for c in with_deadline(store.list, LIST_TIMEOUT_S, f"listing {store.url}")
                         if c.step > step]
                for old in newer:
                    with_deadline(lambda: store.quarantine(old, why), LIST_TIMEOUT_S, f"setting step {old} aside")
            except StorageError as exc:
                log.warning("cannot set aside the checkpoints after step %d in %s: %s", step, store.url, exc)
                continue
            if newer:
                log.warning("set aside steps %s in %s: the run resumed from step %d (resume = best); they are kept "
                            "in .quarantine/ (`savegame ls --json --all` lists them)", newer, store.url, step)
                if store is d.remote and d.mirror is not None:
                    d.mirror.forget()

    def log_resume(self, fallback: bool) -> None:
        d = self.daemon
        point = d.resume_point
        if point is None:
            log.info("starting fresh: %s", "resume is none" if d.settings["resume"] == "none" else "no valid checkpoint")
            return
        why = "falling back one checkpoint" if fallback else f"the {self.config['resume']} valid checkpoint"
        log.info("resuming from step %d (epoch %d, saved as %s) from %s: %s", point.info.step, point.info.epoch,
                 point.info.reason, point.source, why)
