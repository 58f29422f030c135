"""SavegameCallback reports Keras' training loss to the Checkpointer: a NaN in one batch's data rolls the
run back (standalone: exit 76, the anomaly recorded at that batch's position, nothing saved from it on)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.frameworks
SCRIPT = """
import sys
import numpy as np
import keras
from savegame.keras import SavegameCallback

run_dir = sys.argv[1]
x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
y = x.sum(axis=1, keepdims=True)
x[8 * 5 + 3, 2] = np.nan  # in batch 5 of epoch 0 (batch size 8)
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
model.compile(optimizer="sgd", loss="mse")
ckpt = SavegameCallback(run_dir, monitor="loss", save_freq=2, keep_last=100, rollback={"on": ["nan"]})
model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[ckpt], verbose=0)
"""


def test_a_nan_in_fit_rolls_back(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET"))}
    env.update(KERAS_BACKEND="torch", TF_CPP_MIN_LOG_LEVEL="2")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(run)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 76, done.stderr[-4000:]
    assert "the loss went bad at step 5 (batch 5 of epoch 0): the loss is not finite (nan)" in done.stderr
    record = json.loads((run / ".savegame" / "anomalies.json").read_text())["anomalies"]
    assert [(a["step"], a["epoch"], a["batch"]) for a in record] == [(5, 0, 5)]
    kept = sorted(int(p.name[5:]) for p in run.glob("ckpt-*"))
    assert kept == [2, 4], kept  # saved every 2 batches up to the bad one; nothing from step 5 on
