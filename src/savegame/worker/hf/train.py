"""savegame.hf.train(trainer): Trainer.train() on savegame, resumed at the next batch.

The Trainer works out which epochs and batches to skip (and skips them, with its own accelerate-
seeded sampler) only when train() is given a checkpoint folder, before any callback runs. So this
reads savegame's checkpoint first (model weights straight into the model, checksummed; the
optimizer's and scheduler's states kept until train() makes them), writes the Trainer's state as
the one file the Trainer reads from that folder (trainer_state.json: JSON), and calls
train(resume_from_checkpoint=that folder). The folder holds no weights, optimizer or RNG files
(the Trainer would read those with torch.load), so for this one call the Trainer's own weight
loading is skipped: the weights are already in the model.
"""
from __future__ import annotations

from typing import Any

from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from savegame.errors import ConfigError
from savegame.worker.exits import exit_config
from savegame.worker.hf.callback import SavegameCallback

PICKLES = "the Trainer's own checkpoints are pickles (optimizer.pt, rng_state.pth, training_args.bin)"


def train(trainer: Trainer, **kwargs: Any) -> TrainOutput:
    """`trainer.train(**kwargs)` with savegame's checkpoints: resumes from the one savegame chooses.
    Uses the trainer's SavegameCallback, or adds one (monitor and mode from the TrainingArguments)."""
    try:
        _check(trainer, kwargs)
    except ConfigError as exc:
        exit_config(exc)
    callback = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SavegameCallback)), None)
    if callback is None:
        callback = SavegameCallback()
        trainer.add_callback(callback)
    record = callback.bind(trainer)
    if record.loaded is None:
        return trainer.train(**kwargs)
    folder = record.write_folder()  # the callback removes it as training begins
    try:
        trainer._load_from_checkpoint = _weights_already_loaded  # type: ignore[method-assign]  # this call only
        return trainer.train(resume_from_checkpoint=folder, **kwargs)
    finally:
        trainer.__dict__.pop("_load_from_checkpoint", None)
        record.discard_folder()


def _check(trainer: Trainer, kwargs: dict[str, Any]) -> None:
    """What savegame cannot do with this Trainer, said before anything runs."""
    args = trainer.args
    if args.save_strategy != "no":
        given = getattr(args.save_strategy, "value", args.save_strategy)
        raise ConfigError(f"{PICKLES}: set TrainingArguments(save_strategy='no') (it is {given!r}); savegame saves "
                          "instead (SavegameCallback(every_steps=N) for a step schedule)")
    if "resume_from_checkpoint" in kwargs:
        raise ConfigError("savegame chooses the checkpoint to resume from: call savegame.hf.train(trainer) "
                          "without resume_from_checkpoint")
    if trainer.model_init is not None:
        raise ConfigError("model_init (hyper-parameter search) makes a new model inside train(), which savegame "
                          "cannot track: pass the model itself")
    if args.world_size > 1:
        raise ConfigError(f"savegame.hf trains in one process (this run has world_size={args.world_size})")


def _weights_already_loaded(resume_from_checkpoint: str, model: Any = None) -> None:
    """In place of Trainer._load_from_checkpoint: savegame read the weights into the model already."""
