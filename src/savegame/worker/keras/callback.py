"""SavegameCallback: Keras' ModelCheckpoint and BackupAndRestore in one, exact to the batch.

Built on the Checkpointer: each batch end is a step boundary (save on schedule, answer SIGTERM
with an emergency save and exit 75, SIGUSR1 with a save), each epoch end carries the validation
metrics that decide the best checkpoint. A resumed run starts at the next batch: the interrupted
epoch's trained batches are skipped through a ResumableBatches dataset, and what a shortened epoch
does differently from a full one (the tensorflow backend's last empty train call, the torch
backend's data loader seeds) is undone, so the run continues bit for bit.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Mapping, Optional, Union

import keras
import numpy as np

from savegame.errors import ConfigError
from savegame.worker.checkpointer import Checkpointer
from savegame.worker.keras.adapter import ResumableBatches, global_seed_generator, set_torch_rng
from savegame.worker.keras.format import host_array

log = logging.getLogger("savegame.worker")


class SavegameCallback(keras.callbacks.Callback):
    """ModelCheckpoint + BackupAndRestore, exact to the batch, on savegame's crash-safe store.

        train = ResumableBatches(x_train, y_train, batch_size=128, seed=0)
        ckpt = SavegameCallback("checkpoints", monitor="val_accuracy", mode="max",
                                save_best_only=True, data=train)
        model.fit(train, epochs=12, validation_data=(x_val, y_val), callbacks=[ckpt], shuffle=False)

    - monitor, mode ("auto": max for accuracy-like names), min_delta, initial_value_threshold: when a
      checkpoint counts as the best; the best value survives resumes.
    - save_freq: "epoch" or a number of batches (default: every epoch, unless a regime is chosen).
      save_best_only=True keeps the best and the newest checkpoint (the newest is what a restart
      resumes from) unless a regime is chosen; False keeps what the retention says.
    - verbose: 0 warnings only, 1 resumes and improvements (default), 2 every save.
    - save_weights_only: `model.weights.h5` instead of `model.keras` in each checkpoint.
    - data: the ResumableBatches given to fit; without it a mid-epoch resume restarts that epoch.
    - rollback: e.g. {"on": ["nan", "spike"]}: the batch loss Keras logs is watched, and a bad one
      rolls the run back (see [rollback]); fit cannot step over a batch, so skip_batches does not apply.
    On SIGTERM it saves at the next batch end and exits 75; SIGUSR1 saves and goes on. Put it last
    in the callback list so the state it saves includes what the other callbacks did to the model.
    """

    def __init__(self, dir: Optional[str] = None, *, monitor: str = "val_loss", mode: str = "auto",
                 save_best_only: bool = False, save_weights_only: bool = False, min_delta: float = 0.0,
                 save_freq: Union[str, int, None] = None, initial_value_threshold: Optional[float] = None,
                 data: Optional[ResumableBatches] = None, regime: Optional[str] = None,
                 keep_last: Optional[int] = None, keep_best: Optional[int] = None,
                 every_seconds: Optional[float] = None, verbose: int = 1,
                 rollback: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__()
        every_steps, every_epochs = _schedule(save_freq)
        # ModelCheckpoint's habits (save every epoch; save_best_only: keep the best and the newest) are
        # defaults: a regime chosen by the script, the config or `savegame run --regime` replaces them.
        defaults: dict[str, Any] = {"save": {"every_steps": 0, "every_epochs": 1}}
        if save_best_only:
            defaults["keep"] = {"last": 1, "best": 1}
        self.monitor = monitor
        self.save_freq = save_freq or "epoch"
        self.data = data
        self.checkpointer = Checkpointer(dir, monitor=monitor, mode=mode, regime=regime, every_steps=every_steps,
                                         every_epochs=every_epochs, every_seconds=every_seconds,
                                         keep_last=keep_last, keep_best=keep_best, min_delta=min_delta,
                                         framework="keras", initial_best=initial_value_threshold,
                                         verbose=verbose, defaults=defaults, rollback=rollback)
        self.save_weights_only = save_weights_only
        self._restored = False
        self._resume_at: Optional[tuple[int, int]] = None  # (epoch, batches already trained in it)
        self._quiet: Optional[warnings.catch_warnings] = None
        self._torch_rng_at_first_batch: Optional[np.ndarray] = None
        self._short_epoch: Optional[_ShortEpoch] = None

    @property
    def adapter(self) -> Any:
        return self.checkpointer.adapter  # the KerasAdapter that track() made

    @property
    def progress(self) -> Any:
        return self.checkpointer.progress

    @property
    def best(self) -> Optional[float]:
        return self.checkpointer.best

    def on_train_begin(self, logs: Optional[dict] = None) -> None:
        if getattr(self.model, "steps_per_execution", 1) != 1:
            raise ConfigError("SavegameCallback needs steps_per_execution=1 (a checkpoint per batch boundary)")
        if self._restored:
            return
        self._restored = True
        self.checkpointer.track(model=self.model)
        adapter = self.adapter
        adapter.save_weights_only = self.save_weights_only
        _build_metrics(self.model, self.data)
        restored = self.checkpointer.restore()
        self.checkpointer.start_training()
        self.checkpointer.uses_epochs = True  # fit trains in epochs, even when their length is unknown
        if restored is None:
            return
        progress = self.checkpointer.progress
        self.model._initial_epoch = progress.epoch or None  # the hook Keras' BackupAndRestore uses
        if progress.batch_in_epoch:
            if self.data is None:
                log.warning("resuming in the middle of epoch %d, but without data=ResumableBatches(...) the "
                            "batches already trained cannot be skipped: that epoch starts again", progress.epoch)
                progress.batch_in_epoch = 0
                adapter.pending_metrics = []
            else:
                self._resume_at = (progress.epoch, progress.batch_in_epoch)
                self._torch_rng_at_first_batch = adapter.torch_rng

    def on_epoch_begin(self, epoch: int, logs: Optional[dict] = None) -> None:
        start = 0
        if self._resume_at is not None and self._resume_at[0] == epoch:
            start = self._resume_at[1]
            self._short_epoch = _ShortEpoch(self.model, self.data.batches_per_epoch - start)
            if self._short_epoch.remaining == 0:
                self._torch_rng_at_first_batch = None  # no batch left: it stays as restored
            self.adapter.apply_pending_metrics()
            self._quiet = warnings.catch_warnings()  # Keras warns when an epoch is shorter than the first
            self._quiet.__enter__()
            warnings.filterwarnings("ignore", message="Your input ran out of data")
        self._resume_at = None
        if self.data is not None:
            self.data.set_position(epoch, start)
        self.checkpointer.epoch_length = self.data.batches_per_epoch if self.data else self.params.get("steps")

    def on_train_batch_begin(self, batch: int, logs: Optional[dict] = None) -> None:
        if self._torch_rng_at_first_batch is not None:
            # Keras' torch data loader drew from torch's generator when the epoch's iterator was
            # made; an uninterrupted run had made it before the checkpoint. Back to the saved state.
            set_torch_rng(self._torch_rng_at_first_batch)
            self._torch_rng_at_first_batch = None

    def on_train_batch_end(self, batch: int, logs: Optional[dict] = None) -> None:
        metrics = {}
        if isinstance(self.save_freq, int) and (self.progress.step + 1) % self.save_freq == 0:
            value = (logs or {}).get(self.monitor)
            if value is not None:
                metrics[self.monitor] = float(value)  # a batch-level best, checked every save_freq batches
        if self._short_epoch is not None:
            self._short_epoch.batch_done()
        loss = (logs or {}).get("loss")
        if loss is not None:
            self.checkpointer.report(loss)  # the epoch's running mean so far, as Keras logs it
        self.checkpointer.step(**metrics)

    def on_epoch_end(self, epoch: int, logs: Optional[dict] = None) -> None:
        if self._short_epoch is not None:
            self._short_epoch.end()
            self._short_epoch = None
        if self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None
        self.checkpointer.end_epoch(**_scalars(logs or {}))

    def on_train_end(self, logs: Optional[dict] = None) -> None:
        self.checkpointer.finish()
        self.model._initial_epoch = None


class _ShortEpoch:
    """The resumed epoch, shorter than a full one: undoes what ending an epoch early does differently.

    Keras ends it by calling the train step once more on an empty iterator; on the tensorflow
    backend that failed call may already have advanced the seed generators and the optimizer's step
    counter (their updates do not wait for the data): they are copied after the epoch's last batch
    (or at its start, when no batch is left) and put back at its end. On the torch backend, a full
    epoch ends by making the next epoch's data loader iterator, which draws a seed from torch's
    generator; when the resumed epoch trained batches, its own iterator's draw was undone (the
    generator went back to the saved state at its first batch), so that draw is made at its end.
    """

    def __init__(self, model: Any, remaining: int) -> None:
        self.model = model
        self.remaining = remaining
        self.trains = remaining > 0
        self.snapshot = _snapshot_stateful(model) if remaining == 0 else []

    def batch_done(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.snapshot = _snapshot_stateful(self.model)

    def end(self) -> None:
        for variable, value in self.snapshot:
            variable.assign(value)
        if self.trains and keras.backend.backend() == "torch":
            import torch
            torch.empty((), dtype=torch.int64).random_()  # the seed of the iterator a full epoch makes


def _snapshot_stateful(model: Any) -> list[tuple[Any, np.ndarray]]:
    """Copies of the state a train step changes without looking at the data: seed generators, the
    optimizer's step counter (scalars: a failed step cannot have touched the slots)."""
    variables = list(model.non_trainable_variables)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None:
        variables += [v for v in optimizer.variables if len(v.shape) == 0]
    seed = global_seed_generator(create=False)
    if seed is not None:
        variables.append(seed.state)
    return [(v, np.array(host_array(v))) for v in variables]


def _build_metrics(model: Any, data: Optional[ResumableBatches]) -> None:
    """The tensorflow backend builds compiled metrics in the first train step; a mid-epoch resume
    must put their running values back before it, so build them now (symbolically, as the torch
    backend's fit does; inference mode: no seed is drawn)."""
    compiled = getattr(model, "_compile_metrics", None)
    if data is not None and compiled is not None and not compiled.built and len(data.x):
        position = (data.epoch, data.start)
        data.set_position(0, 0)
        try:
            model._symbolic_build(data_batch=data[0])
        finally:
            data.set_position(*position)


def _schedule(save_freq: Union[str, int, None]) -> tuple[Optional[int], Optional[int]]:
    """(every_steps, every_epochs) for an explicit ModelCheckpoint-style save_freq; None: the defaults."""
    if save_freq is None:
        return None, None
    if save_freq == "epoch":
        return 0, 1
    if isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq > 0:
        return save_freq, 0
    raise ConfigError(f"save_freq must be 'epoch' or a positive number of batches, not {save_freq!r}")


def _scalars(logs: dict) -> dict[str, float]:
    out = {}
    for key, value in logs.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out
