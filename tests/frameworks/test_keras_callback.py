"""SavegameCallback's ModelCheckpoint semantics, on a tiny model in one tensorflow-backend process.

A scripted callback placed before SavegameCallback sets the epoch's validation metric, so which
checkpoint counts as the best is known in advance. The process runs every case and prints one JSON
object; each test checks its part.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.frameworks


def _run_cases(tmp: Path, backend: str, which: str) -> dict[str, Any]:
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET"))}
    env.update(KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, __file__, which, str(tmp)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run_cases(tmp_path_factory.mktemp("keras-callback"), "tensorflow", "semantics")


@pytest.mark.parametrize("backend", ["tensorflow", "torch"])
def test_stops_on_an_epochs_last_batch_and_mid_epoch_resume_exactly(backend: str, tmp_path: Path) -> None:
    """SIGTERM at the boundary after an epoch's last batch (the resumed epoch has no batch left),
    then mid-epoch: both resumed runs end with the weights, optimizer state and per-epoch train
    metrics of the uninterrupted run, bit for bit."""
    r = _run_cases(tmp_path, backend, "exact")
    assert r["stopped"] == [[4, "emergency"], [10, "emergency"]]
    assert r["interrupted"] == r["uninterrupted"]
    assert r["tensorflow_imported"] is (backend == "tensorflow")


def test_initial_value_threshold_must_be_beaten(results: dict[str, Any]) -> None:
    r = results["threshold"]
    assert r["best_reasons"] == [[3, 0.9]]  # 0.5 and 0.7 do not beat the threshold 0.8
    assert r["best"] == 0.9


def test_min_delta_and_auto_mode(results: dict[str, Any]) -> None:
    assert results["min_delta"]["best_reasons"] == [[1, 0.5], [3, 0.6]]  # 0.52 is not 0.05 better than 0.5
    assert results["auto_min"]["best_reasons"] == [[1, 1.0], [2, 0.8]]  # val_loss: smaller is better


def test_save_best_only_keeps_the_best_and_the_newest(results: dict[str, Any]) -> None:
    r = results["best_only"]
    assert r["kept"] == [[2, "best", 0.9], [3, "periodic", 0.7]]


def test_save_freq_in_batches(results: dict[str, Any]) -> None:
    # every 3 batches, but one due on an epoch's last batch waits for the epoch end (step 12 "best")
    assert results["save_freq"]["steps"] == [3, 4, 6, 8, 9, 12]


def test_resumed_run_never_overwrites_a_better_best(results: dict[str, Any]) -> None:
    r = results["resume_best"]
    assert r["best_at_resume"] == 0.9
    assert r["best_reasons"] == [[1, 0.5], [2, 0.9], [4, 0.95]]  # epoch 3's 0.7 was not saved as a best


def test_fit_shuffle_true_does_not_reorder_resumable_batches(results: dict[str, Any]) -> None:
    r = results["shuffle_guard"]
    assert r["requested"] == [list(range(4))] * 2
    assert r["warned"] is True


def test_weights_file_is_what_save_weights_writes(results: dict[str, Any]) -> None:
    assert results["h5_same_as_save_weights"] is True
    assert results["keras_file_loads"] is True


def test_steps_per_execution_is_refused(results: dict[str, Any]) -> None:
    assert "steps_per_execution=1" in results["steps_per_execution"]


def test_mid_epoch_resume_without_data_restarts_the_epoch(results: dict[str, Any]) -> None:
    r = results["no_data"]
    assert r["resumed_progress"] == [1, 6, 0]  # epoch 1, step 6, batch 0: the interrupted epoch starts again
    assert r["warned"] is True


def test_a_crafted_extra_of_another_dtype_is_refused_with_78(results: dict[str, Any]) -> None:
    assert results["crafted_extra"] == 78


def test_signals_are_taken_over_only_while_fit_trains(results: dict[str, Any]) -> None:
    assert results["signals"] == {"made": True, "training": True, "after": True}


# -- the cases, run in their own process ---------------------------------------------------------------

def _cases(tmp: str) -> dict[str, Any]:
    import logging
    import signal

    import keras
    import numpy as np

    from savegame.keras import ResumableBatches, SavegameCallback
    from savegame.storage import CheckpointStore

    warnings_seen: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings_seen.append(record.getMessage())

    logging.getLogger("savegame").addHandler(Capture())
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")

    def model() -> Any:
        keras.utils.set_random_seed(0)
        m = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dropout(0.2),
                              keras.layers.Dense(2, activation="softmax")])
        m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return m

    class Script(keras.callbacks.Callback):
        def __init__(self, name: str, values: list[float], stop_after: int | None = None) -> None:
            super().__init__()
            self.name, self.values, self.stop_after = name, values, stop_after

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            logs[self.name] = self.values[epoch]  # type: ignore[index]

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if self.stop_after is not None and cb_steps[0] + 1 == self.stop_after:
                os.kill(os.getpid(), signal.SIGTERM)  # the emergency stop at this batch's boundary

    cb_steps = [0]
    last_model: list[Any] = []

    def fit(run: str, values: list[float], epochs: int, name: str = "val_accuracy", stop_after: int | None = None,
            data: bool = True, **options: Any) -> tuple[SavegameCallback, list]:
        m = model()
        batches = ResumableBatches(x, y, batch_size=16, seed=0)
        cb = SavegameCallback(os.path.join(tmp, run), monitor=name, data=batches if data else None, **options)

        class Count(keras.callbacks.Callback):
            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                cb_steps[0] = cb.progress.step

        try:
            m.fit(batches, epochs=epochs, verbose=0, shuffle=False,
                  callbacks=[Count(), Script(name, values, stop_after), cb])
        except SystemExit as exc:
            assert exc.code == 75, exc.code
        last_model[:] = [m]
        return cb, CheckpointStore(os.path.join(tmp, run)).list()

    def best_reasons(listing: list, name: str = "val_accuracy") -> list:
        return [[c.epoch, c.metrics[name]] for c in sorted(listing, key=lambda c: c.step) if c.reason == "best"]

    out: dict[str, Any] = {}
    cb, listing = fit("threshold", [0.5, 0.7, 0.9], 3, initial_value_threshold=0.8, keep_last=100)
    out["threshold"] = {"best_reasons": best_reasons(listing), "best": cb.best}
    cb, listing = fit("min_delta", [0.5, 0.52, 0.6], 3, min_delta=0.05, keep_last=100)
    out["min_delta"] = {"best_reasons": best_reasons(listing)}
    cb, listing = fit("auto_min", [1.0, 0.8, 0.9], 3, name="val_loss", keep_last=100)
    out["auto_min"] = {"best_reasons": best_reasons(listing, "val_loss")}
    cb, listing = fit("best_only", [0.5, 0.9, 0.7], 3, save_best_only=True)
    out["best_only"] = {"kept": [[c.epoch, c.reason, c.metrics["val_accuracy"]] for c in listing]}
    cb, listing = fit("save_freq", [0.1, 0.2, 0.3], 3, save_freq=3, keep_last=100)
    out["save_freq"] = {"steps": [c.step for c in listing]}

    fit("resume_best", [0.5, 0.9, 0.7, 0.95], 4, stop_after=9, keep_last=100)  # stopped in epoch 3
    cb, listing = fit("resume_best", [0.5, 0.9, 0.7, 0.95], 4, keep_last=100)
    out["resume_best"] = {"best_at_resume": None, "best_reasons": best_reasons(listing)}
    resumed = [c for c in listing if c.reason == "emergency"]
    out["resume_best"]["best_at_resume"] = json.loads(
        open(os.path.join(resumed[0].path, "state.json")).read())["history"]["best"] if resumed else None

    # fit(shuffle=True) must not make Keras ask for the batches in a random order
    requested: list[list[int]] = []

    class Recording(ResumableBatches):
        def on_epoch_begin(self) -> None:
            super().on_epoch_begin()
            requested.append([])

        def __getitem__(self, i: int) -> tuple:
            if requested:
                requested[-1].append(i)
            return super().__getitem__(i)

    warnings_seen.clear()
    m = model()
    m.fit(Recording(x, y, batch_size=16, seed=0), epochs=2, verbose=0, shuffle=True)
    out["shuffle_guard"] = {"requested": requested, "warned": any("shuffle" in w for w in warnings_seen)}

    # the files: model.weights.h5 as model.save_weights writes it; model.keras loads with Keras
    cb, listing = fit("files_h5", [0.5], 1, save_weights_only=True)
    last_model[0].save_weights(os.path.join(tmp, "reference.weights.h5"))  # the same model, right after its final save
    from test_keras_examples import _same_h5
    out["h5_same_as_save_weights"] = _same_h5(os.path.join(tmp, "reference.weights.h5"),
                                             os.path.join(listing[-1].path, "model.weights.h5"))
    cb, listing = fit("files_keras", [0.5], 1)
    loaded = keras.models.load_model(os.path.join(listing[-1].path, "model.keras"), safe_mode=True)
    out["keras_file_loads"] = bool(np.allclose(loaded.predict(x, verbose=0), loaded.predict(x, verbose=0)))

    # a crafted state.safetensors (checksums recomputed): a metric's state as I32 where the model's is F32
    import shutil

    from test_crafted_payloads import read_tensors, retype, rewrite
    crafted = Path(tmp, "crafted", Path(listing[-1].path).name)
    shutil.copytree(listing[-1].path, crafted)
    name, _dtype, shape, _data = next(t for t in read_tensors(crafted)[1] if t[1] == "F32")
    rewrite(crafted, retype(name, "I32", shape, 4))
    batches = ResumableBatches(x, y, batch_size=16, seed=0)
    try:
        model().fit(batches, epochs=2, verbose=0, shuffle=False,
                    callbacks=[SavegameCallback(str(crafted.parent), data=batches)])
        out["crafted_extra"] = "loaded"
    except SystemExit as exc:
        out["crafted_extra"] = exc.code

    m = model()
    m.compile(optimizer="adam", loss="sparse_categorical_crossentropy", steps_per_execution=2)
    try:
        m.fit(x, y, epochs=1, verbose=0, callbacks=[SavegameCallback(os.path.join(tmp, "spe"))])
        out["steps_per_execution"] = "accepted"
    except Exception as exc:  # noqa: BLE001
        out["steps_per_execution"] = str(exc)

    # signals: taken over while fit trains (from on_train_begin), given back after it, not when the callback is made
    cb = SavegameCallback(os.path.join(tmp, "signals"))
    seen = {"made": signal.getsignal(signal.SIGTERM) is signal.SIG_DFL}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict | None = None) -> None:
            seen["training"] = signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)

    model().fit(x, y, epochs=1, verbose=0, callbacks=[cb, Probe()])
    seen["after"] = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    out["signals"] = seen

    # resuming mid-epoch without data=: the interrupted epoch starts again (warned)
    fit("no_data", [0.5, 0.6, 0.7], 3, stop_after=6, data=False, save_freq=2, keep_last=100)
    warnings_seen.clear()
    m = model()
    cb = SavegameCallback(os.path.join(tmp, "no_data"), monitor="val_accuracy", save_freq=2, keep_last=100)
    cb.set_model(m)
    cb.on_train_begin()
    p = cb.progress
    out["no_data"] = {"resumed_progress": [p.epoch, p.step, p.batch_in_epoch],
                      "warned": any("cannot be skipped" in w for w in warnings_seen)}
    cb.checkpointer.close()
    return out


def _exact(tmp: str) -> dict[str, Any]:
    import hashlib
    import signal

    import keras
    import numpy as np

    from savegame.keras import ResumableBatches, SavegameCallback, set_random_seed
    from savegame.storage import CheckpointStore

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")

    class StopAt(keras.callbacks.Callback):
        def __init__(self, cb: SavegameCallback, step: int | None) -> None:
            super().__init__()
            self.cb, self.step = cb, step

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if self.step is not None and self.cb.progress.step + 1 == self.step:
                os.kill(os.getpid(), signal.SIGTERM)  # saved at this very boundary, then exit 75

    def run(folder: str, stop: int | None) -> dict[str, Any]:
        set_random_seed(0)
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dropout(0.3), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        data = ResumableBatches(x, y, batch_size=16, seed=0)
        cb = SavegameCallback(os.path.join(tmp, folder), save_freq=3, keep_last=100, data=data, monitor="loss")
        history: dict = {}
        try:
            history = model.fit(data, epochs=4, verbose=0, shuffle=False, validation_data=(x[:16], y[:16]),
                                callbacks=[StopAt(cb, stop), cb]).history
        except SystemExit as exc:
            assert exc.code == 75
        def digest(variables: list) -> str:  # values only: layer names differ between models of one process
            return hashlib.sha256(b"".join(np.asarray(keras.ops.convert_to_numpy(v)).tobytes()
                                           for v in variables)).hexdigest()
        return {"weights": digest(model.weights), "optimizer": digest(model.optimizer.variables), "history": history}

    uninterrupted = run("reference", None)
    run("interrupted", 4)  # after the last batch of epoch 1: the resumed epoch has no batch left
    run("interrupted", 10)  # mid-epoch 3
    resumed = run("interrupted", None)
    listing = CheckpointStore(os.path.join(tmp, "interrupted")).list()
    # the history of the last run covers the epochs it trained; compare those with the reference's
    tail = {k: v[-len(resumed["history"]["loss"]):] for k, v in uninterrupted["history"].items()}
    return {"stopped": [[c.step, c.reason] for c in listing if c.reason == "emergency"],
            "uninterrupted": [uninterrupted["weights"], uninterrupted["optimizer"], tail],
            "interrupted": [resumed["weights"], resumed["optimizer"], resumed["history"]],
            "tensorflow_imported": "tensorflow" in sys.modules}


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    print(json.dumps(_cases(sys.argv[2]) if sys.argv[1] == "semantics" else _exact(sys.argv[2])))
