"""Hand-written loops and loaders without a length: a periodic save due at a step that may be the
epoch's last waits one boundary, so an epoch end right after it saves that step with the epoch's
metrics (and as the best when it improved); otherwise the next step saves. Scripts that know the
epoch length say so (steps_per_epoch=N or ckpt.epoch_length) and keep exact save steps."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest

from savegame import Checkpointer
from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SAVEGAME_"):
            monkeypatch.delenv(key)


def batches(n: int) -> Iterator[int]:
    """A loader without a length (a generator, an IterableDataset's DataLoader)."""
    yield from range(n)


def train(run_dir: Path, losses: list[float], per_epoch: int, length: Optional[int] = None,
          set_attribute: bool = False, **options: Any) -> list[tuple[int, int, str, dict]]:
    ckpt = Checkpointer(str(run_dir), handle_signals=False, monitor="val_loss", mode="min", every_epochs=0,
                        **({"steps_per_epoch": length} if length and not set_attribute else {}), **options)
    if set_attribute:
        ckpt.epoch_length = length
    weights = np.zeros(4)
    ckpt.track(w=weights)
    ckpt.restore()
    for epoch in ckpt.epochs(len(losses)):
        for _ in ckpt.batches(batches(per_epoch)):
            weights += 1
        ckpt.end_epoch(val_loss=losses[epoch])
    ckpt.finish()
    return [(c.step, c.epoch, c.reason, dict(c.metrics)) for c in CheckpointStore(str(run_dir)).list()]


def test_a_save_due_on_the_epochs_last_step_keeps_the_epochs_metrics(tmp_path: Path) -> None:
    """every_steps equals the epoch length of a loader without len(): every save lands on an epoch's
    last step. Each must carry its epoch's metrics, so the best is known and kept."""
    kept = train(tmp_path / "run", [3.0, 1.0, 2.0, 4.0], per_epoch=4, every_steps=4, keep_last=1, keep_best=1)
    assert kept == [(8, 2, "best", {"val_loss": 1.0}), (16, 4, "periodic", {"val_loss": 4.0})]


def test_every_save_of_such_a_run_has_its_epoch_and_metrics(tmp_path: Path) -> None:
    saved = train(tmp_path / "run", [3.0, 1.0, 2.0], per_epoch=4, every_steps=4, keep_last=100)
    assert saved == [(4, 1, "best", {"val_loss": 3.0}), (8, 2, "best", {"val_loss": 1.0}),
                     (12, 3, "periodic", {"val_loss": 2.0})]


@pytest.mark.parametrize("in_epochs, steps", [(True, [5, 9, 10]), (False, [4, 8, 10])],
                         ids=["in-epochs", "plain-step-loop"])
def test_without_an_epoch_end_at_that_step_the_next_step_saves(tmp_path: Path, in_epochs: bool,
                                                                steps: list[int]) -> None:
    """In epochs of unknown length the save waits one step; a plain step loop (no epochs at all)
    has no epoch end to wait for and saves at the exact steps."""
    ckpt = Checkpointer(str(tmp_path / "run"), handle_signals=False, every_steps=4, every_epochs=0, keep_last=100)
    weights = np.zeros(4)
    ckpt.track(w=weights)
    ckpt.restore()
    for _ in ckpt.epochs(1) if in_epochs else [0]:
        for _ in range(10):
            weights += 1
            ckpt.step()
    ckpt.finish()
    assert [c.step for c in CheckpointStore(str(tmp_path / "run")).list()] == steps


@pytest.mark.parametrize("set_attribute", [False, True], ids=["steps_per_epoch", "epoch_length"])
def test_a_given_epoch_length_keeps_exact_save_steps(tmp_path: Path, set_attribute: bool) -> None:
    saved = train(tmp_path / "run", [3.0, 1.0], per_epoch=4, length=4, set_attribute=set_attribute,
                  every_steps=2, keep_last=100)
    assert saved == [(2, 0, "periodic", {}), (4, 1, "best", {"val_loss": 3.0}), (6, 1, "periodic", {}),
                     (8, 2, "best", {"val_loss": 1.0})]


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4", True])
def test_a_bad_steps_per_epoch_is_a_configuration_error(tmp_path: Path, bad: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        Checkpointer(str(tmp_path / "run"), handle_signals=False, steps_per_epoch=bad)
    assert exited.value.code == 78
