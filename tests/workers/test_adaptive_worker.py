"""`every_seconds = "auto"` in the worker: the schedule follows the interval worked out from the measured
costs and the run's record; a resumed worker starts from the costs its checkpoint brought; a spike
window survives a resume. In-process, on a NumPy state (no clock is faked: only the wiring is checked)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from savegame import Checkpointer
from savegame.strategies import EveryNSeconds
from savegame.strategies.interval import BOOTSTRAP_S, Reliability, auto_interval

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SAVEGAME_"):
            monkeypatch.delenv(key)


def checkpointer(run_dir: Path, **options) -> tuple[Checkpointer, np.ndarray]:
    ckpt = Checkpointer(str(run_dir), handle_signals=False, every_epochs=0, **options)
    weights = np.zeros(1 << 16)
    ckpt.track(w=weights)
    ckpt.restore()
    ckpt.start_training()
    return ckpt, weights


def seconds_in_schedule(ckpt: Checkpointer) -> list[float]:
    return [p.seconds for p in ckpt._schedule.parts if isinstance(p, EveryNSeconds)]  # noqa: SLF001


def test_the_schedule_follows_the_measured_interval(tmp_path, monkeypatch):
    monkeypatch.setenv("SAVEGAME_RELIABILITY", json.dumps({"failures": 50, "observed_s": 3600.0}))
    ckpt, weights = checkpointer(tmp_path, every_seconds="auto")
    assert seconds_in_schedule(ckpt) == [BOOTSTRAP_S]  # nothing measured yet
    for _ in range(3):
        weights += 1
        ckpt.step()
        ckpt.save(wait=True)
    interval = ckpt._cadence.interval  # noqa: SLF001
    assert interval.cost is not None and interval.seconds != BOOTSTRAP_S
    assert "50 failures in 1.0h" in interval.why  # the record the daemon passed on
    expected = auto_interval(interval.cost, 86400.0, Reliability(50, 3600.0))
    assert interval.seconds == pytest.approx(expected.seconds, rel=0.1)
    assert seconds_in_schedule(ckpt) == [interval.seconds]
    ckpt.finish()


def test_a_resumed_worker_starts_from_the_costs_its_checkpoint_brought(tmp_path):
    ckpt, weights = checkpointer(tmp_path, every_seconds="auto")
    for _ in range(3):
        weights += 1
        ckpt.step()
        ckpt.save(wait=True)
    cost = ckpt._cadence.cost  # noqa: SLF001
    ckpt.close()
    again, _ = checkpointer(tmp_path, every_seconds="auto")
    assert again._cadence.cost is not None and again._cadence.interval.cost is not None  # noqa: SLF001
    assert again._cadence.cost.stall_s <= cost.stall_s * 10  # the saved estimate, not a fresh bootstrap  # noqa: SLF001
    assert seconds_in_schedule(again) != [BOOTSTRAP_S]
    again.close()


def test_the_spike_window_survives_a_resume(tmp_path):
    rule = {"on": ["spike"], "window": 20}
    ckpt, _ = checkpointer(tmp_path, rollback=rule)
    for _ in range(15):
        ckpt.report(1.0)
        ckpt.step()
    ckpt.save(wait=True)
    ckpt.close()
    again, _ = checkpointer(tmp_path, rollback=rule)
    again.report(50.0)  # a fresh window would know too little to call it a spike
    assert again._guard.pending is not None and again._guard.pending.anomaly.kind == "spike"  # noqa: SLF001
    again._guard.pending = None  # noqa: SLF001 - not rolling back in this test
    again.close()
