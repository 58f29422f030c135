"""Lightning's Trainer.fit on savegame, under the real daemon: a SIGKILLed worker is restarted from
its last checkpoint, a SIGTERM gets an emergency checkpoint (the daemon exits 0), a new daemon
resumes it, and the run ends with the same weights as an uninterrupted one, bit for bit."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Daemon, wait_until
from savegame.storage import CheckpointStore

pytestmark = pytest.mark.frameworks
pytest.importorskip("lightning")
pytest.importorskip("torchdata")

EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "lightning_mnist.py")
ARGS = ["--epochs", "3", "--limit-batches", "16", "--batch-size", "32", "--seed", "2", "--log-every", "1"]
HASH = re.compile(r"^final-weights-sha256 ([0-9a-f]{64})$", re.M)


def steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"^step (\d+) ", text, re.M)]


def test_interrupted_under_the_daemon_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    reference = subprocess.run([sys.executable, EXAMPLE, *ARGS, "--dir", str(tmp_path / "ref")], env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = HASH.findall(reference.stdout)[-1]

    run = tmp_path / "run"
    daemon = Daemon(run, [EXAMPLE, *ARGS, "--save-every-steps", "5"]).start()
    first = daemon.ready(timeout=120)
    wait_until(lambda: max(steps(daemon.stdout), default=0) >= 12, timeout=120)  # mid-epoch 1
    os.kill(first, signal.SIGKILL)  # a crash: restarted from the last periodic checkpoint
    second = daemon.worker_pid(timeout=120, other_than=first)
    wait_until(lambda: daemon.status().get("worker_ready") and daemon.status().get("worker_pid") == second,
               timeout=120)
    wait_until(lambda: max(steps(daemon.stdout), default=0) >= 22, timeout=120)  # mid-epoch 2
    daemon.signal(signal.SIGTERM)  # a stop: emergency checkpoint, then the daemon exits 0
    assert daemon.wait(timeout=120) == 0, daemon.stderr[-3000:]
    latest = CheckpointStore(str(run)).latest()
    # mid-epoch 2 (steps 17-32): the printed "step N" can run one ahead of the boundary the stop lands on
    assert latest is not None and latest.reason == "emergency" and 16 < latest.step < 48

    again = Daemon(run, [EXAMPLE, *ARGS, "--save-every-steps", "5"]).start()  # a daemon restart
    assert again.wait(timeout=300) == 0, again.stderr[-3000:]
    assert f"resumed from step {latest.step}" in again.stdout + again.stderr
    assert HASH.findall(again.stdout)[-1] == expected
    best = max(CheckpointStore(str(run)).list(), key=lambda c: c.metrics.get("val_acc", -1))
    assert best.metrics["val_acc"] == max(c.metrics.get("val_acc", -1) for c in CheckpointStore(str(run)).list())


def test_a_resume_at_an_epoch_boundary_draws_the_next_epoch_s_data_order(tmp_path: Path) -> None:
    """Stopped at an epoch's end (here: a run of 2 epochs continued to 3), the next epoch must see the
    data order the uninterrupted run saw. Lightning does not restore a StatefulDataLoader's position
    at an epoch boundary, and the loader's sampler keeps its own generator: without savegame putting
    it back, epoch 3 replayed epoch 1's order."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}

    def train(epochs: str, folder: str) -> str:
        args = ["--epochs", epochs, "--limit-batches", "16", "--batch-size", "32", "--seed", "2"]
        done = subprocess.run([sys.executable, EXAMPLE, *args, "--dir", str(tmp_path / folder)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    expected = HASH.findall(train("3", "ref"))[-1]
    train("2", "run")
    resumed = train("3", "run")
    assert "resumed from step 32 (epoch 2)" in resumed, resumed[-2000:]
    assert HASH.findall(resumed)[-1] == expected
