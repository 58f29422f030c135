"""The TensorFlow MNIST example (custom loop, tf.train.Checkpoint inside savegame checkpoints) under
`savegame run`: the same scenario as the Keras example's (reference run; worker SIGKILLed mid-epoch;
daemon SIGTERMed mid-epoch; resumed to the end), then a checker process that loads the files with
TensorFlow's own tf.train.Checkpoint and checks that damaged or mismatched checkpoints are refused.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

import pytest

from test_keras_examples import (BATCHES, EPOCHS, EXAMPLES, Scenario, _run_to_end, check_best_never_worse,
                                 check_resumed_at_next_batch, check_same_weights, clean_env, run_scenario)

pytestmark = pytest.mark.frameworks

TF_EXAMPLE = EXAMPLES / "tf_mnist_cnn.py"
TF_ARGS = ["--epochs", str(EPOCHS), "--limit-batches", str(BATCHES), "--batch-size", "32", "--seed", "1",
           "--save-checkpoints-steps", "4", "--deterministic"]


@pytest.fixture(scope="module")
def tf_scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    tmp = tmp_path_factory.mktemp("tf")
    env = clean_env()
    s = run_scenario(tmp, TF_EXAMPLE, TF_ARGS, env)
    started = time.monotonic()
    out = _run_to_end([sys.executable, __file__, str(s.run_dir), str(tmp)], env, 300)
    s.checker = json.loads(out.strip().splitlines()[-1])
    s.timings["checker_s"] = time.monotonic() - started
    print(f"tf timings: {s.timings}")
    return s


def test_tf_resumes_at_next_batch_no_batch_twice_or_skipped(tf_scenario: Scenario) -> None:
    check_resumed_at_next_batch(tf_scenario)


def test_tf_interrupted_run_ends_with_identical_weights(tf_scenario: Scenario) -> None:
    check_same_weights(tf_scenario)


def test_tf_best_checkpoint_never_replaced_by_worse(tf_scenario: Scenario) -> None:
    check_best_never_worse(tf_scenario)


def test_tf_checkpoint_loads_with_tf_train_checkpoint(tf_scenario: Scenario) -> None:
    c = tf_scenario.checker
    assert c["files"] == ["tf/checkpoint", "tf/ckpt.data-00000-of-00001", "tf/ckpt.index"]
    assert c["latest_checkpoint"].endswith("/tf/ckpt")
    assert c["restored_hash"] == tf_scenario.final_hash
    assert c["restored_step"] == c["newest_step"] == EPOCHS * BATCHES
    assert c["next_batch_after_restore"] == c["expected_next_batch"]  # the iterator's position came back too


def test_tf_damaged_or_mismatched_checkpoint_refused(tf_scenario: Scenario) -> None:
    c = tf_scenario.checker
    assert "checksum mismatch" in c["tampered"], c["tampered"]
    assert c["tampered_resume_fell_back_to"] == c["older_step"]
    assert "does not match" in c["other_model"] or "shape" in c["other_model"], c["other_model"]


def test_tf_keep_checkpoint_max(tf_scenario: Scenario) -> None:
    assert tf_scenario.checker["kept_with_max_2"] == [4, 5]


# -- the checker: runs as a script, in its own TensorFlow process ------------------------------------

def _checker(run_dir: str, tmp: str) -> dict[str, Any]:
    sys.path.insert(0, str(EXAMPLES))
    import keras
    import numpy as np
    import tensorflow as tf
    from mnist_data import load_mnist
    from tf_mnist_cnn import build_model, make_dataset

    import savegame.tensorflow as stf
    from savegame.errors import SavegameError
    from savegame.storage import CheckpointStore
    from savegame.worker.adapter import CheckpointReader
    from savegame.worker.tensorflow.adapter import TensorFlowAdapter

    store = CheckpointStore(run_dir)
    checkpoints = sorted(store.list(), key=lambda c: c.step)
    newest, older = checkpoints[-1], checkpoints[-2]
    out: dict[str, Any] = {"newest_step": newest.step, "older_step": older.step,
                           "files": sorted(f.path for f in newest.manifest.files if f.path.startswith("tf/"))}
    x_train, y_train, _xv, _yv = load_mnist(None, seed=1)
    x_train = x_train[..., np.newaxis]
    keras.utils.set_random_seed(1)  # as the example does: the shuffle's seeds depend on the global seed

    def objects(model: Any) -> dict[str, Any]:
        optimizer = keras.optimizers.SGD(learning_rate=0.05)
        optimizer.build(model.trainable_variables)
        return {"model": model, "optimizer": optimizer, "iterator": iter(make_dataset(tf, x_train, y_train, 1, 32))}

    # TensorFlow's own API, straight from the checkpoint folder
    model = build_model(keras)
    step = tf.Variable(0, dtype=tf.int64)
    tracked = objects(model)
    latest = tf.train.latest_checkpoint(os.path.join(newest.path, "tf"))
    out["latest_checkpoint"] = latest
    tf.train.Checkpoint(step=step, **tracked).read(latest).assert_existing_objects_matched()
    out["restored_hash"] = stf.weights_sha256(model)
    out["restored_step"] = int(step.numpy())
    out["next_batch_after_restore"] = next(tracked["iterator"])[2].numpy()[:5].tolist()
    fresh = iter(make_dataset(tf, x_train, y_train, 1, 32))
    for _ in range(EPOCHS * BATCHES):
        next(fresh)
    out["expected_next_batch"] = next(fresh)[2].numpy()[:5].tolist()

    # tampered: a flipped byte in the newest TensorFlow data file; resuming falls back to the one before
    copy = os.path.join(tmp, "tampered")
    for info in (older, newest):
        shutil.copytree(info.path, os.path.join(copy, info.name))
    data_file = os.path.join(copy, newest.name, "tf", "ckpt.data-00000-of-00001")
    with open(data_file, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    copied = CheckpointStore(copy)
    try:
        CheckpointReader(copied, copied.get(newest.step)).verified_local_path("tf/ckpt.data-00000-of-00001")
        out["tampered"] = "accepted"
    except SavegameError as exc:
        out["tampered"] = str(exc)
    ckpt = stf.auto_resume(copy, **objects(build_model(keras)))
    out["tampered_resume_fell_back_to"] = ckpt.resumed_from
    ckpt.close()

    # Estimator-like: keep_checkpoint_max bounds what stays in the folder
    keep_dir = os.path.join(tmp, "keep")
    tiny = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    ckpt = stf.auto_resume(keep_dir, keep_checkpoint_max=2, save_checkpoints_steps=1, model=tiny,
                           optimizer=keras.optimizers.SGD(0.1))
    for _epoch in ckpt.epochs(1):
        for _batch in ckpt.batches(range(5)):
            pass
    ckpt.finish()
    out["kept_with_max_2"] = [c.step for c in CheckpointStore(keep_dir).list()]

    # a checkpoint of another model: refused with a clear error
    other = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    adapter = TensorFlowAdapter()
    adapter.add(**objects(other))
    try:
        adapter.restore(CheckpointReader(store, older))
        out["other_model"] = "accepted"
    except SavegameError as exc:
        out["other_model"] = str(exc)
    return out


if __name__ == "__main__":
    print(json.dumps(_checker(*sys.argv[1:3])))
