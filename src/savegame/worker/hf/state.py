"""The Trainer's pieces as objects a Checkpointer tracks (state_dict / load_state_dict).

The checkpoint is read before Trainer.train() starts, because the Trainer decides which epochs
and batches to skip from its TrainerState before any callback runs; the optimizer and scheduler
only exist later (train() makes them), so their saved states wait in a `Later` until then.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Optional

from transformers import Trainer, TrainerState
from transformers.trainer_callback import ExportableState

TRAINER_STATE = "trainer_state.json"  # the name Trainer.train(resume_from_checkpoint=FOLDER) reads


class Later:
    """A tracked object made after the checkpoint was read: its saved state is applied by attach()."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.target: Any = None
        self.pending: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:
        if self.target is None:
            raise RuntimeError(f"the Trainer has no {self.name} yet: savegame saves only while it trains")
        return self.target.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.target is None:
            self.pending = state
        else:
            self.target.load_state_dict(state)

    def attach(self, target: Any) -> None:
        """The Trainer made it: from now on it is what is saved, and it gets the saved state, if any."""
        self.target = target
        pending, self.pending = self.pending, None
        if pending is not None:
            target.load_state_dict(pending)


class TrainerStateRecord:
    """The Trainer's TrainerState (global step, epoch, log history, best metric, the states of its
    stateful callbacks) as the JSON text of its own trainer_state.json."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.loaded: Optional[str] = None  # the text of the checkpoint being resumed from
        self.folder: Optional[str] = None

    def state_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self.trainer.state)
        state["stateful_callbacks"] = self._callback_states()
        return {"json": json.dumps(state, sort_keys=True, default=_plain)}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        text = saved.get("json")
        try:
            TrainerState(**json.loads(text))  # type: ignore[arg-type]  # what the Trainer will read must fit
        except (TypeError, ValueError) as exc:
            raise ValueError(f"the saved TrainerState does not fit this transformers version: {exc}") from None
        self.loaded = text

    def write_folder(self) -> str:
        """A new temporary folder with the loaded state as trainer_state.json: what
        Trainer.train(resume_from_checkpoint=FOLDER) reads (and, with no other file there, all)."""
        self.folder = tempfile.mkdtemp(prefix="savegame-hf-")
        with open(os.path.join(self.folder, TRAINER_STATE), "w", encoding="utf-8") as f:
            f.write(self.loaded or "")
        return self.folder

    def discard_folder(self) -> None:
        """Remove it once the Trainer has read it, so a SIGKILL later leaves nothing behind."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None

    def _callback_states(self) -> dict[str, Any]:
        """What the Trainer's own checkpoint would hold (as in Trainer._save_checkpoint): each stateful
        callback's state(), several of one class as a list."""
        states: dict[str, Any] = {}
        for callback in [*self.trainer.callback_handler.callbacks, self.trainer.control]:
            if not isinstance(callback, ExportableState):
                continue
            name, value = type(callback).__name__, callback.state()
            if name not in states:
                states[name] = value
            elif isinstance(states[name], list):
                states[name].append(value)
            else:
                states[name] = [states[name], value]
        return states


def _plain(value: Any) -> Any:
    """NumPy and torch scalars in logs, as numbers."""
    item = getattr(value, "item", None)
    if callable(item):
        return item()
    raise TypeError(f"cannot save a {type(value).__name__} in the TrainerState")
