"""SavegameCallback for Lightning: `Trainer.fit` saved and resumed through savegame.

    trainer = L.Trainer(max_epochs=5, enable_checkpointing=False, num_sanity_val_steps=0,
                        callbacks=[SavegameCallback(monitor="val_acc", mode="max")])
    trainer.fit(model, train_loader, val_loader)      # no ckpt_path: savegame resumes by itself

What Lightning's own checkpoint holds (optimizers, schedulers, loop progress, callbacks, the
StatefulDataLoader position, precision) is taken from Lightning at each step boundary and written
by the Checkpointer as JSON and safetensors (never pickled), with the model tracked as "model"
(so `savegame export` and `savegame.torch.load_weights` find it) and the RNG states. Restoring
hands the same dictionary back to Lightning's own restore path, in `setup()`, before Lightning
restores training state: the run continues at the next batch, exactly when the training data is a
torchdata StatefulDataLoader (Lightning restores its position); a plain DataLoader resumes at the
interrupted epoch's position in Lightning's counters but not in the data (Lightning warns).
SIGTERM: an emergency checkpoint at the next batch end, exit 75. SIGUSR1: a checkpoint.
"""
from __future__ import annotations

import random
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch

from savegame.worker.checkpointer import Checkpointer

DROPPED = ("hyper_parameters", "hparams_name", "hparams_type", "state_dict")  # the model is saved as "model"


class LightningState:
    """Lightning's checkpoint dictionary as a tracked object (state_dict / load_state_dict)."""

    def __init__(self, trainer: "pl.Trainer") -> None:
        self.trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        checkpoint = self.trainer._checkpoint_connector.dump_checkpoint(weights_only=False)  # noqa: SLF001
        return {key: value for key, value in checkpoint.items() if key not in DROPPED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Lightning restores optimizers, schedulers, loops (and the loader position) and callbacks
        # from this dictionary right after setup(), as if trainer.fit(ckpt_path=...) had loaded it.
        model = self.trainer.lightning_module
        self.trainer._checkpoint_connector._loaded_checkpoint = {**state, "state_dict": model.state_dict()}  # noqa: SLF001


class SavegameCallback(pl.Callback):
    """Checkpoints a `Trainer.fit` run with savegame: every step boundary is one (the schedule
    decides), epoch ends carry `trainer.callback_metrics` (monitor= picks the best).

    Arguments as Checkpointer's (dir, monitor, mode, regime, every_steps, every_epochs,
    every_seconds, keep_last, keep_best, verbose); the default schedule (every epoch) gives way to a
    regime chosen by `savegame run --regime`."""

    def __init__(self, dir: Optional[str] = None, *, monitor: Optional[str] = None, mode: str = "auto",
                 verbose: int = 1, **options: Any) -> None:
        super().__init__()
        self.checkpointer = Checkpointer(dir, monitor=monitor, mode=mode, framework="torch", verbose=verbose,
                                         defaults={"save": {"every_steps": 0, "every_epochs": 1}}, **options)
        self._rng_at_first_batch: Optional[tuple[Any, Any, Any]] = None
        self._set_up = False

    @property
    def best(self) -> Optional[float]:
        return self.checkpointer.best

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" or self._set_up:
            return
        self._set_up = True
        self.checkpointer.track(model=pl_module, lightning=LightningState(trainer))
        restored = self.checkpointer.restore()
        if restored is not None and not self.checkpointer.progress.batch_in_epoch:
            _start_a_fresh_epoch(trainer)
        if restored is not None and self.checkpointer.progress.batch_in_epoch:
            # An uninterrupted run had made this epoch's data iterator (drawing seeds) before the
            # checkpoint; the resumed run makes it again: back to the saved states at the first batch.
            self._rng_at_first_batch = (torch.get_rng_state(), random.getstate(), np.random.get_state())

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.checkpointer.start_training()
        self.checkpointer.uses_epochs = True
        self.checkpointer.epoch_length = _batches_per_epoch(trainer)

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self._rng_at_first_batch is not None:
            torch_state, python_state, numpy_state = self._rng_at_first_batch
            torch.set_rng_state(torch_state)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            self._rng_at_first_batch = None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.checkpointer.step()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.checkpointer.end_epoch(**_scalars(trainer.callback_metrics))

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.checkpointer.finish()


def _start_a_fresh_epoch(trainer: "pl.Trainer") -> None:
    """Saved at an epoch's end, Lightning starts the next epoch with a new loader iterator and does not
    restore the loader's saved position (it belongs to the epoch just ended). A StatefulDataLoader's
    sampler keeps its own generator, which the uninterrupted run had advanced by one data order per
    epoch; a new process has it at its first order. Put the generator where the saved epoch left it
    (its state at that epoch's start, advanced by that epoch's order), so the next epoch draws the
    order the uninterrupted run drew. Only a loader given to fit() itself can be reached here."""
    loaded = trainer._checkpoint_connector._loaded_checkpoint  # noqa: SLF001 - set by LightningState
    states = (loaded or {}).get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    source = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)  # noqa: SLF001
    loaders = source if isinstance(source, (list, tuple)) else [source]
    for loader, state in zip(loaders, states):
        sampler_state = state.get("_sampler_iter_state") if isinstance(state, dict) else None
        batch_sampler = getattr(loader, "batch_sampler", None)
        if sampler_state is None or batch_sampler is None:
            continue
        order = iter(batch_sampler)  # torchdata's: its load_state_dict sets the generator and draws that order
        if hasattr(order, "load_state_dict"):
            order.load_state_dict(sampler_state)


def _batches_per_epoch(trainer: "pl.Trainer") -> Optional[int]:
    count = trainer.num_training_batches
    return int(count) if isinstance(count, int) and count > 0 else None


def _scalars(metrics: Any) -> dict[str, float]:
    out = {}
    for key, value in dict(metrics).items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out
