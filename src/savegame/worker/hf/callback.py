"""SavegameCallback for the Hugging Face Trainer: every optimizer step a savegame step boundary.

A step's boundary is taken at the *next* step's start (on_step_begin), or at the end of training:
by then the Trainer has logged, evaluated (the metrics are known) and fetched the next batch, and
the RNG states are exactly those the next training step starts from. That is what the checkpoint
holds, and what a resumed run sets back just before its first step (the Trainer's own resume does
the same with its rng_state.pth), so the resumed run trains the very steps an uninterrupted one does.
"""
from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from savegame.errors import ConfigError
from savegame.worker.checkpointer import Checkpointer
from savegame.worker.exits import exit_config, warn_once
from savegame.worker.hf.state import Later, TrainerStateRecord
from savegame.worker.torch.loader import shield_loader_workers

SPEED = ("_runtime", "_per_second")  # the Trainer's speed metrics (eval_runtime, eval_samples_per_second...)
NOT_THROUGH_TRAIN = ("start training with savegame.hf.train(trainer), not trainer.train(): only it can resume the "
                     "Trainer at the next batch (see docs/huggingface.md)")


class SavegameCallback(TrainerCallback):
    """Checkpoints a Trainer run with savegame; start it with `savegame.hf.train(trainer)`.

    Arguments as Checkpointer's (dir, regime, every_steps, every_epochs, every_seconds, keep_last,
    keep_best, min_delta, verbose). monitor and mode default to the Trainer's metric_for_best_model
    ("eval_" + name, as the Trainer reads it) and greater_is_better. The default schedule (every
    epoch, and each new best) gives way to a regime chosen by `savegame run --regime`."""

    def __init__(self, dir: Optional[str] = None, *, monitor: Optional[str] = None, mode: Optional[str] = None,
                 verbose: int = 1, **options: Any) -> None:
        self._dir, self._monitor, self._mode, self._verbose, self._options = dir, monitor, mode, verbose, options
        self.checkpointer: Optional[Checkpointer] = None
        self._record: Optional[TrainerStateRecord] = None
        self._later = {"optimizer": Later("optimizer"), "scheduler": Later("scheduler")}
        self._rng_at_resume: Optional[tuple[Any, ...]] = None
        self._metrics: dict[str, float] = {}  # evaluated and logged since the last boundary
        self._epoch_done = False

    @property
    def best(self) -> Optional[float]:
        return self.checkpointer.best if self.checkpointer else None

    def bind(self, trainer: Trainer) -> TrainerStateRecord:
        """Make the Checkpointer and read the checkpoint to resume from (savegame.hf.train calls it
        before Trainer.train). Returns the TrainerState record: `.loaded` is set on a resume."""
        monitor, mode = self._policy(trainer.args)
        every_epoch = {"save": {"every_steps": 0, "every_epochs": 1}}  # gives way to a chosen regime
        self.checkpointer = Checkpointer(self._dir, monitor=monitor, mode=mode, framework="torch",
                                         verbose=self._verbose, defaults=every_epoch, **self._options)
        record = self._record = TrainerStateRecord(trainer)
        tracked: dict[str, Any] = {"model": trainer.model, **self._later, "trainer_state": record}
        scaler = getattr(trainer.accelerator, "scaler", None)
        if scaler is not None:
            tracked["scaler"] = scaler
        self.checkpointer.track(**tracked)
        if self.checkpointer.restore() is not None:
            self._rng_at_resume = _rng_states()
        return record

    def _policy(self, args: TrainingArguments) -> tuple[Optional[str], str]:
        """savegame's monitor and mode: the Trainer's metric_for_best_model and greater_is_better
        (the callback's own monitor=/mode= only where the Trainer has none)."""
        name = args.metric_for_best_model
        if name is None:
            return self._monitor, self._mode or "auto"
        metric = name if name.startswith("eval_") else f"eval_{name}"
        mode = "max" if args.greater_is_better else "min"
        if (self._monitor or metric) != metric or (self._mode or mode) != mode:
            exit_config(ConfigError(f"SavegameCallback(monitor={self._monitor!r}, mode={self._mode!r}) disagrees with "
                                    f"metric_for_best_model={name!r}, greater_is_better={args.greater_is_better}: "
                                    "set only the Trainer's"))
        return metric, mode

    # -- the Trainer's events --------------------------------------------------------------------

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       optimizer: Any = None, lr_scheduler: Any = None, train_dataloader: Any = None,
                       **kwargs: Any) -> None:
        ckpt = self.checkpointer
        if ckpt is None:
            exit_config(ConfigError(NOT_THROUGH_TRAIN))
        try:
            self._later["optimizer"].attach(optimizer)
            self._later["scheduler"].attach(lr_scheduler)
        except (RuntimeError, KeyError, ValueError) as exc:
            exit_config(ConfigError(f"cannot load the optimizer or scheduler of step {ckpt.progress.step}: {exc}"))
        if state.global_step != ckpt.progress.step:
            exit_config(ConfigError(f"the Trainer resumed at step {state.global_step}, savegame at step "
                                    f"{ckpt.progress.step}: start training with savegame.hf.train(trainer)"))
        if self._record is not None:
            self._record.discard_folder()  # the Trainer has read it; from here on it checks only for files there
        ckpt.start_training()
        self._follow(ckpt, args, state, train_dataloader)

    def _follow(self, ckpt: Checkpointer, args: TrainingArguments, state: TrainerState, loader: Any) -> None:
        """The Checkpointer counts epochs and steps as the Trainer does."""
        ckpt.uses_epochs = True
        ckpt.epoch_length = _steps_per_epoch(loader, args.gradient_accumulation_steps)
        if ckpt.epoch_length:  # the Trainer's own count: global_step // steps per epoch, the rest in this one
            ckpt.progress.epoch, ckpt.progress.batch_in_epoch = divmod(state.global_step, ckpt.epoch_length)
        if args.eval_strategy == "steps":  # epochs may end between evaluations; the Trainer checks the name itself
            ckpt.narrator.unneeded("monitor")
        if args.ignore_data_skip and ckpt.progress.batch_in_epoch:
            warn_once("ignore_data_skip", "ignore_data_skip=True: the resumed epoch starts again from its first "
                                          "batch, so this run is not the one an uninterrupted run trains")
        if loader is not None:
            shield_loader_workers(loader)  # its worker processes survive a SIGTERM sent to the whole group

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      **kwargs: Any) -> None:
        self._boundary(state)
        if self._rng_at_resume is not None:  # the first step after a resume starts from the saved states
            _set_rng_states(self._rng_at_resume)
            self._rng_at_resume = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    **kwargs: Any) -> None:
        self._epoch_done = state.epoch is not None and float(state.epoch).is_integer()

    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                           **kwargs: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.heartbeat()  # a long evaluation is not a hang (rate-limited)

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    metrics: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self._metrics.update(_numbers(metrics or {}))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self._metrics.update(_numbers({"loss": (logs or {}).get("loss")}))  # the training loss, when logged

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self.checkpointer is not None:
            self._boundary(state)
            self.checkpointer.finish()

    def _boundary(self, state: TrainerState) -> None:
        """The boundary of the optimizer step that ended since the last one, if any (with the
        epoch's end when it was the epoch's last step); it saves, stops or reports as due."""
        ckpt = self.checkpointer
        if ckpt is None or state.global_step <= ckpt.progress.step:
            return
        metrics, self._metrics = self._metrics, {}
        if self._epoch_done:  # one boundary: a stop here saves the epoch's count and metrics too
            self._epoch_done = False
            ckpt.progress.step += 1
            ckpt.progress.batch_in_epoch += 1
            ckpt.end_epoch(**metrics)
        else:
            ckpt.step(**metrics)


def _steps_per_epoch(loader: Any, accumulation: int) -> Optional[int]:
    """Optimizer steps per epoch, as the Trainer counts them (None without a loader length)."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numbers about the model (not the epoch, nor the Trainer's timings) for the manifest."""
    return {key: float(value) for key, value in values.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and key != "epoch" and not key.endswith(SPEED)}


def _rng_states() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _set_rng_states(states: tuple[Any, ...]) -> None:
    cpu, cuda, python, numpy = states
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(python)
    np.random.set_state(numpy)
