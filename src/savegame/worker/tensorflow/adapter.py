"""TensorFlow adapter: tf.train.Checkpoint files inside savegame checkpoints, with Estimator-like resume.

Each savegame checkpoint holds a TensorFlow checkpoint under `tf/` (`ckpt.index`,
`ckpt.data-*`, and the `checkpoint` state file), written by tf.train.Checkpoint.write on the
training thread and copied into the store with checksums by the writer. It holds the tracked
objects (model, optimizer, the tf.data iterator with its shuffle buffer and position, ...), a
`step` counter, and the Keras seed generator states that TensorFlow's object graph does not see
(dropout draws). `tf.train.Checkpoint(...).restore(tf.train.latest_checkpoint(".../tf"))` loads it
directly; savegame verifies every file's checksum before TensorFlow reads it.

    ckpt = savegame.tensorflow.auto_resume("model_dir", keep_checkpoint_max=1, monitor="val_accuracy",
                                           model=model, optimizer=optimizer, iterator=iterator)
    for epoch in ckpt.epochs(epochs):
        for x, y in ckpt.batches(EpochSteps(iterator, steps_per_epoch)):
            train_step(x, y)
        ckpt.end_epoch(val_accuracy=evaluate())
    ckpt.finish()
"""
from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import socket
import tempfile
from typing import Any, Iterable, Iterator, Optional

import tensorflow as tf

from savegame.errors import ConfigError, CorruptCheckpoint
from savegame.storage.backends import STAGING_DIR
from savegame.worker.adapter import Capture, CheckpointReader, Owner

TF_DIR = "tf"
PREFIX = "ckpt"
STATE_FILE = "checkpoint"  # what tf.train.latest_checkpoint reads


class EpochSteps:
    """`steps` batches per epoch from one long-lived tf.data iterator (the one you track).

    The iterator's position is part of the checkpoint, so a resumed run continues with exactly the
    batch an uninterrupted run would have seen next (with repeat(), shuffle buffers and all).
    """

    def __init__(self, iterator: Any, steps: int) -> None:
        self.iterator = iterator
        self.steps = int(steps)

    def remaining(self, done: int) -> Iterator[Any]:
        return itertools.islice(self.iterator, max(self.steps - done, 0))

    def __iter__(self) -> Iterator[Any]:
        return self.remaining(0)

    def __len__(self) -> int:
        return self.steps


def _is_trackable(obj: Any) -> bool:
    return isinstance(obj, (tf.Variable, tf.__internal__.tracking.Trackable))


class TensorFlowAdapter:
    framework = "tensorflow"

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self.live_state_damaged = False  # a failed restore left partly-read values in the objects
        self._owner: Optional[Owner] = None
        self._step = tf.Variable(0, dtype=tf.int64, trainable=False, name="savegame_step")
        self._checkpoint: Optional[tf.train.Checkpoint] = None

    def bind(self, checkpointer: Owner) -> None:
        self._owner = checkpointer

    def add(self, **objects: Any) -> None:
        for name, obj in objects.items():
            if name in ("step", "keras_state"):
                raise ConfigError(f"track(): the name {name!r} is savegame's own; choose another")
            if isinstance(obj, EpochSteps):
                obj = obj.iterator
            if not _is_trackable(obj):
                raise ConfigError(f"track(): {name}={type(obj).__name__} is not trackable by tf.train.Checkpoint "
                                  "(models, optimizers, variables, tf.data iterators, tf.random.Generator are)")
            self.objects[name] = obj
        self._checkpoint = None

    def _tf_checkpoint(self) -> tf.train.Checkpoint:
        if self._checkpoint is None:
            extras = _keras_state(self.objects.values())
            self._checkpoint = tf.train.Checkpoint(step=self._step, **self.objects,
                                                   **({"keras_state": extras} if extras else {}))
        return self._checkpoint

    # -- saving ---------------------------------------------------------------------------------

    def capture(self) -> Capture:
        if not self.objects:
            raise ConfigError("nothing to save: track(model=..., optimizer=..., iterator=...) first")
        _build_optimizers(self.objects.values())
        self._step.assign(self._owner.progress.step if self._owner is not None else 0)
        tmp = self._scratch_folder()
        try:
            self._tf_checkpoint().write(os.path.join(tmp, PREFIX))
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                f.write(f'model_checkpoint_path: "{PREFIX}"\nall_model_checkpoint_paths: "{PREFIX}"\n')
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        files = {f"{TF_DIR}/{name}": os.path.join(tmp, name) for name in sorted(os.listdir(tmp))}
        state = {"prefix": f"{TF_DIR}/{PREFIX}", "objects": sorted(self.objects)}
        return Capture(state=state, files=files, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True))

    def _scratch_folder(self) -> str:
        """Where TensorFlow writes before the writer copies the files in: the run folder's .staging/,
        named like a staging folder (host, pid), so savegame's garbage collection (the next start, or
        the daemon after a worker died) removes it when this process is killed mid-save."""
        store = self._owner.store if self._owner is not None else None
        if store is None or not store.is_local:
            return tempfile.mkdtemp(prefix="savegame-tf-")  # removed after the copy; a kill leaves it
        base = os.path.join(store.location.path, STAGING_DIR)
        os.makedirs(base, exist_ok=True)
        return tempfile.mkdtemp(prefix=f"tf-capture.{socket.gethostname()}.{os.getpid()}.", dir=base)

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, reader: CheckpointReader) -> None:
        state = reader.state.get("adapter", {})
        missing = sorted(set(self.objects) - set(state.get("objects", [])))
        if missing:
            raise ConfigError(f"{reader.info.path} holds no state for {missing}; it was saved by another script")
        prefix = state.get("prefix", f"{TF_DIR}/{PREFIX}")
        tf_files = [f.path for f in reader.info.manifest.files if f.path.startswith(prefix + ".")]
        if not any(path.endswith(".index") for path in tf_files):
            raise CorruptCheckpoint(f"{reader.info.path}: no TensorFlow checkpoint ({prefix}.index) in the manifest")
        for path in tf_files:
            reader.verified_local_path(path)  # every byte TensorFlow reads has been checked
        _build_optimizers(self.objects.values())
        self.live_state_damaged = True  # until this restore has completed
        try:
            status = self._tf_checkpoint().read(os.path.join(reader.info.path, prefix))
            status.assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as exc:
            raise ConfigError(f"{reader.info.path}: the TensorFlow checkpoint does not match the tracked "
                              f"objects: {str(exc)[:400]}") from None
        if self._owner is not None and int(self._step.numpy()) != int(reader.state["progress"]["step"]):
            raise CorruptCheckpoint(f"{reader.info.path}: its TensorFlow step {int(self._step.numpy())} is not the "
                                    f"step in state.json ({reader.state['progress']['step']})")
        self.live_state_damaged = False

    # -- data position --------------------------------------------------------------------------

    def prepare_loader(self, loader: Iterable[Any], epoch: int, skip_batches: int,
                       mid_epoch: bool) -> tuple[Iterator[Any], int]:
        """An EpochSteps over a tracked iterator is already where the checkpoint left it."""
        if isinstance(loader, EpochSteps):
            if any(loader.iterator is obj for obj in self.objects.values()):
                if self._owner is not None:
                    self._owner.epoch_length = loader.steps  # a step save due on the last batch waits for the epoch end
                return loader.remaining(skip_batches), skip_batches
            raise ConfigError("ckpt.batches(EpochSteps(iterator, n)): track(iterator=iterator) too, so its position "
                              "is saved")
        return iter(loader), 0


def _keras_objects(objects: Iterable[Any]) -> list[Any]:
    try:
        import keras
    except ImportError:  # pragma: no cover - TensorFlow without Keras
        return []
    return [o for o in objects if isinstance(o, keras.layers.Layer)]


def _keras_state(objects: Iterable[Any]) -> dict[str, Any]:
    """Keras 3 seed generator states (and other non-trainable variables) TensorFlow does not track."""
    extras: dict[str, Any] = {}
    for i, layer in enumerate(_keras_objects(objects)):
        for j, variable in enumerate(layer.non_trainable_variables):
            value = getattr(variable, "value", variable)
            if isinstance(value, tf.Variable):
                extras[f"m{i}_v{j}"] = value
    return extras


def _build_optimizers(objects: Iterable[Any]) -> None:
    """Keras optimizers create their slots on first use; a restore needs them to exist."""
    try:
        import keras
    except ImportError:  # pragma: no cover
        return
    objects = list(objects)
    models = [o for o in objects if isinstance(o, keras.Model)]
    for optimizer in (o for o in objects if isinstance(o, keras.optimizers.Optimizer)):
        if not optimizer.built and len(models) == 1:
            optimizer.build(models[0].trainable_variables)


def weights_sha256(model: Any) -> str:
    """A hash of a model's weights (names and bytes, in order), to compare runs bit for bit."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(getattr(variable, "path", variable.name).encode())
        digest.update(variable.numpy().tobytes())
    return digest.hexdigest()
