"""`savegame export` and load_weights for Keras (.keras, .weights.h5) and TensorFlow (a
tf.train.Checkpoint prefix): each run in its own process (one framework per process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.frameworks
SAVEGAME = str(Path(sys.executable).parent / "savegame")

KERAS = r'''
import json, os, subprocess, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
import keras, numpy as np
import savegame.keras as sk
folder, out, savegame = sys.argv[1], sys.argv[2], sys.argv[3]
sk.set_random_seed(0)
x, y = np.random.rand(64, 4).astype("float32"), np.random.randint(0, 2, 64)
def build():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                          keras.layers.Dense(2, name="out")], name="net")
    m.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return m
hashes = {}
class Record(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        hashes[epoch + 1] = sk.weights_sha256(self.model)
model = build()
model.fit(x, y, epochs=3, batch_size=16, validation_data=(x, y), verbose=0,
          callbacks=[Record(), sk.SavegameCallback(folder, monitor="val_loss", verbose=0)])
result = {"hashes": hashes}
for which, to in (("--best", "best.keras"), ("--best", "best.weights.h5"), ("--latest", "latest.weights.h5")):
    done = subprocess.run([savegame, "export", folder, which, "--to", os.path.join(out, to)], capture_output=True, text=True)
    result[to] = done.stdout + done.stderr
best = sk.load_model(folder, which="best")  # the run's stored policy: val_loss, min
from savegame.storage import CheckpointStore
result["best_epoch"] = min(CheckpointStore(folder).list(), key=lambda c: c.metrics.get("val_loss", 9e9)).epoch
result["load_model_best"] = sk.weights_sha256(best)
result["exported_keras"] = sk.weights_sha256(keras.models.load_model(os.path.join(out, "best.keras")))
m = build(); m.load_weights(os.path.join(out, "best.weights.h5")); result["exported_h5"] = sk.weights_sha256(m)
m = build(); m.load_weights(os.path.join(out, "latest.weights.h5")); result["exported_latest"] = sk.weights_sha256(m)
print("RESULT " + json.dumps(result))
'''

TF = r'''
import json, os, subprocess, sys
import keras, numpy as np, tensorflow as tf
import savegame.tensorflow as stf
folder, out, savegame = sys.argv[1], sys.argv[2], sys.argv[3]
keras.utils.set_random_seed(0)
def build():
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu", name="hidden"),
                             keras.layers.Dense(2, name="out")], name="net")
model, optimizer = build(), keras.optimizers.SGD(0.1)
iterator = iter(tf.data.Dataset.from_tensor_slices(np.random.rand(64, 4).astype("float32")).batch(16).repeat())
ckpt = stf.auto_resume(folder, monitor="val_accuracy", mode="max", model=model, optimizer=optimizer, iterator=iterator)
hashes = {}
for epoch in ckpt.epochs(3):
    for x in ckpt.batches(stf.EpochSteps(iterator, 4)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
    ckpt.end_epoch(val_accuracy=[0.5, 0.9, 0.7][epoch])
    hashes[ckpt.progress.step] = stf.weights_sha256(model)
ckpt.finish()
done = subprocess.run([savegame, "export", folder, "--best", "--to", os.path.join(out, "best")], capture_output=True, text=True)
result = {"hashes": hashes, "export": done.stdout + done.stderr, "files": sorted(os.listdir(out))}
m = build(); tf.train.Checkpoint(model=m).read(os.path.join(out, "best")).expect_partial()
result["exported"] = stf.weights_sha256(m)
m = build(); result["loaded_step"] = stf.load_weights(m, folder).step; result["loaded"] = stf.weights_sha256(m)
print("RESULT " + json.dumps(result))
'''


def scenario(script: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run"), str(out), SAVEGAME],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_keras_export_and_load(tmp_path: Path) -> None:
    r = scenario(KERAS, tmp_path)
    for to in ("best.keras", "best.weights.h5", "latest.weights.h5"):
        assert r[to].startswith("exported step"), r[to]
    assert r["exported_keras"] == r["exported_h5"] == r["load_model_best"] == r["hashes"][str(r["best_epoch"])]
    assert r["exported_latest"] == r["hashes"]["3"]


def test_tensorflow_export_is_a_checkpoint_prefix(tmp_path: Path) -> None:
    r = scenario(TF, tmp_path)
    assert r["export"].startswith("exported step 8 (epoch 2"), r["export"]
    assert r["files"] == ["best.data-00000-of-00001", "best.index"]
    assert r["exported"] == r["loaded"] == r["hashes"]["8"] and r["loaded_step"] == 8
