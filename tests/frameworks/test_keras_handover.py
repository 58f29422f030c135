"""Keras under the shared-memory hand-over (`savegame run --shared-memory`): the worker renders its
.weights.h5 into the segment and the daemon commits it; the checkpoint is byte-identical to one the
worker writes itself. The MNIST example on the torch Keras backend (one framework per process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Daemon, clean_env, committed_steps

pytestmark = [pytest.mark.frameworks, pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")]
EXAMPLE = str(Path(__file__).resolve().parents[2] / "examples" / "keras_mnist_cnn.py")
ARGS = ["--epochs", "2", "--limit-batches", "4", "--save-freq", "2", "--deterministic", "--verbose", "0",
        "--weights-only"]


def test_keras_saves_are_handed_over_and_identical_to_in_process_ones(tmp_path):
    env = {"KERAS_BACKEND": "torch"}
    alone, supervised = tmp_path / "alone", tmp_path / "supervised"
    result = subprocess.run([sys.executable, EXAMPLE, *ARGS, "--dir", str(alone)], env=clean_env(env),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    daemon = Daemon(supervised, [EXAMPLE, *ARGS], ["--shared-memory"], env=env).start()
    assert daemon.wait(300) == 0, daemon.stderr[-3000:]
    assert daemon.stderr.count("from shared memory") == 4, daemon.stderr[-3000:]  # steps 2, 4, 6, 8
    assert "writing it here" not in daemon.stderr  # not one fell back to an in-process write
    final = "final-weights-sha256 "
    assert [line for line in result.stdout.splitlines() if line.startswith(final)] == \
        [line for line in daemon.stdout.splitlines() if line.startswith(final)]
    (step,) = committed_steps(alone)
    assert committed_steps(supervised) == [step]
    name = f"ckpt-{step:012d}"
    a = json.loads((alone / name / "manifest.json").read_text())
    b = json.loads((supervised / name / "manifest.json").read_text())
    assert a["files"] == b["files"] and {f["path"] for f in a["files"]} >= {"model.weights.h5"}
    for f in a["files"]:
        assert (alone / name / f["path"]).read_bytes() == (supervised / name / f["path"]).read_bytes()
