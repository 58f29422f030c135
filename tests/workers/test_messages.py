"""What the worker says: a monitored metric that is never reported is named at once, with a
did-you-mean; Keras-style lines for resumes and improvements (verbose); a short regime that
resumed does not keep its resume source once a newer checkpoint stands in for it."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

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


def train(run_dir: Path, values: Sequence[float], epochs: int, name: str = "val_acc", per_epoch: int = 2,
          stop_after_steps: int = 0, **options: Any) -> Checkpointer:
    """`epochs` epochs of `per_epoch` steps; epoch e reports values[e] as `name`."""
    options.setdefault("monitor", "val_acc")
    options.setdefault("mode", "max")
    ckpt = Checkpointer(str(run_dir), handle_signals=False, **options)
    ckpt.track(w=np.zeros(3))
    ckpt.restore()
    for epoch in ckpt.epochs(epochs):
        for _ in ckpt.batches(range(per_epoch)):  # skips what a mid-epoch checkpoint had trained
            if stop_after_steps and ckpt.progress.step == stop_after_steps:
                ckpt.save(wait=True)
                ckpt.close()
                return ckpt
        ckpt.end_epoch(**{name: values[epoch], "loss": 1.0 - values[epoch]})
    ckpt.finish()
    return ckpt


def said(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("savegame: ")]


def test_a_monitored_metric_never_reported_is_named_once_with_a_did_you_mean(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = train(tmp_path / "run", [0.5, 0.7, 0.6], 3, name="val_accuracy")
    warnings = [line for line in said(capsys) if "warning" in line]
    assert len(warnings) == 1, warnings
    assert "monitor='val_acc' was not reported at epoch 1" in warnings[0]
    assert "reported: loss, val_accuracy" in warnings[0] and "did you mean 'val_accuracy'?" in warnings[0]
    assert ckpt.best is None


def test_no_warning_when_the_metric_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(tmp_path / "run", [0.5, 0.7], 2)
    assert not [line for line in said(capsys) if "warning" in line]


def test_improvements_and_resumes_are_said_keras_style(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(run, [0.5, 0.7, 0.6, 0.9], 4, every_epochs=1, stop_after_steps=7)
    lines = said(capsys)
    assert "savegame: epoch 1: val_acc improved to 0.5, saved step 2 (best)" in lines, lines
    assert "savegame: epoch 2: val_acc improved from 0.5 to 0.7, saved step 4 (best)" in lines, lines
    assert not any(line.startswith("savegame: epoch 3") for line in lines), lines  # no improvement: quiet at verbose 1
    train(run, [0.5, 0.7, 0.6, 0.9], 4, every_epochs=1)
    lines = said(capsys)
    assert lines[0] == "savegame: resumed from step 7 (epoch 3, batch 1), best val_acc 0.7", lines
    assert "savegame: epoch 4: val_acc improved from 0.7 to 0.9, saved step 8 (best)" in lines, lines


def test_verbose_levels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(tmp_path / "quiet", [0.5, 0.7, 0.6], 3, verbose=0)
    assert said(capsys) == []
    train(tmp_path / "chatty", [0.5, 0.7, 0.6], 3, verbose=2, every_epochs=1)
    lines = said(capsys)
    assert "savegame: epoch 3: val_acc did not improve from 0.7, saved step 6 (periodic)" in lines, lines
    assert "savegame: saved step 6 (final)" in lines or any("saved step" in line for line in lines), lines


def test_short_regime_keeps_two_after_a_resume(tmp_path: Path) -> None:
    """The checkpoint a run resumed from is not kept once newer ones stand in for it."""
    run = tmp_path / "run"
    train(run, [0.9, 0.5, 0.4, 0.3], 2, regime="short")
    train(run, [0.9, 0.5, 0.4, 0.3], 4, regime="short")
    steps = [c.step for c in CheckpointStore(str(run)).list()]
    assert steps == [2, 8], steps  # the best (epoch 1) and the latest; not step 4, the resume source
