"""auto_resume: what an Estimator's RunConfig(model_dir, keep_checkpoint_max) did, on a Checkpointer.

Apart from the adapter so that the adapter never imports the Checkpointer (which loads adapters)."""
from __future__ import annotations

from typing import Any, Optional

from savegame.worker.checkpointer import Checkpointer


def auto_resume(model_dir: Optional[str] = None, *, keep_checkpoint_max: Optional[int] = None,
                save_checkpoints_steps: Optional[int] = None, save_checkpoints_epochs: Optional[int] = 1,
                save_checkpoints_secs: Optional[float] = None, monitor: Optional[str] = None, mode: str = "auto",
                **objects: Any) -> Checkpointer:
    """What an Estimator's RunConfig(model_dir, keep_checkpoint_max, save_checkpoints_steps) did.

    Tracks the objects, restores the newest valid checkpoint in `model_dir` (falling back past a
    damaged one) and returns the Checkpointer that drives the loop. Retention keeps the newest
    `keep_checkpoint_max` (and the best, when a metric is monitored).
    """
    ckpt = Checkpointer(model_dir, framework="tensorflow", monitor=monitor, mode=mode, keep_last=keep_checkpoint_max,
                        keep_best=1 if monitor else None, every_steps=save_checkpoints_steps or 0,
                        every_epochs=save_checkpoints_epochs or 0, every_seconds=save_checkpoints_secs or 0)
    ckpt.track(**objects)
    ckpt.restore()
    return ckpt
