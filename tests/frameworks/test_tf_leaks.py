"""The TensorFlow adapter writes tf.train.Checkpoint files into a scratch folder before the writer
copies them in; a worker SIGKILLed meanwhile must not leave that folder behind for good."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.frameworks

SCRIPT = """
import os, signal, sys
import tensorflow as tf
from savegame import Checkpointer

v = tf.Variable([1.0, 2.0])
ckpt = Checkpointer(sys.argv[1], framework="tensorflow")
ckpt.track(v=v)
ckpt.restore()
ckpt.step()
if sys.argv[2] == "kill":
    ckpt.adapter.capture()  # what a save does first: TensorFlow writes its files into the scratch folder
    os.kill(os.getpid(), signal.SIGKILL)  # killed before the writer copied them in
ckpt.finish()
"""


def test_a_worker_killed_mid_save_leaves_no_tensorflow_scratch_folder(tmp_path: Path) -> None:
    tmp, run_dir = tmp_path / "t", tmp_path / "run"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    env.update(TMPDIR=str(tmp), TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    killed = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), "kill"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p for p in [*tmp.iterdir(), *(run_dir / ".staging").glob("*")] if "tf" in p.name]
    assert leftovers, "the killed worker left no scratch folder: this test proves nothing"
    again = subprocess.run([sys.executable, "-c", SCRIPT, str(run_dir), "finish"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [p.name for p in tmp.iterdir() if p.name.startswith("savegame-tf")] == []
    assert list((run_dir / ".staging").iterdir()) == []  # the next start collected what the dead one left
