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
ARGS = ["--epochs", "2", "--limit-batches", "4", "--save-freq", "2", "--deterministic", "--verbose", "0"]


@pytest.mark.parametrize("payload", ["model.weights.h5", "model.keras"])
def test_keras_saves_are_handed_over_and_identical_to_in_process_ones(tmp_path, payload):
    """A .keras archive records when it was saved (metadata.json), so it is compared by the weights it
    loads to, not byte for byte; every other file is compared byte for byte."""
    env = {"KERAS_BACKEND": "torch"}
    args = ARGS + (["--weights-only"] if payload.endswith(".weights.h5") else [])
    alone, supervised = tmp_path / "alone", tmp_path / "supervised"
    result = subprocess.run([sys.executable, EXAMPLE, *args, "--dir", str(alone)], env=clean_env(env),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    daemon = Daemon(supervised, [EXAMPLE, *args], ["--shared-memory"], env=env).start()
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
    assert {f["path"] for f in a["files"]} == {f["path"] for f in b["files"]} >= {payload}
    for f in a["files"]:
        if f["path"] != "model.keras":
            assert (alone / name / f["path"]).read_bytes() == (supervised / name / f["path"]).read_bytes()
    if payload == "model.keras":
        assert loaded_weights_sha256(alone / name / payload) == loaded_weights_sha256(supervised / name / payload)


def loaded_weights_sha256(path: Path) -> str:
    """The checkpoint's archive loaded in a fresh process (one framework per process)."""
    code = ("import sys, keras; from savegame.keras import weights_sha256; "
            "print(weights_sha256(keras.saving.load_model(sys.argv[1], compile=False)))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=clean_env({"KERAS_BACKEND": "torch"}),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]
