"""A TensorFlow run's model out of its checkpoints, verified (TensorFlow reads only checked bytes):

    savegame.tensorflow.load_weights(model, "model_dir", which="best")

The savegame checkpoint holds a `tf.train.Checkpoint` of every tracked object; the model is read
by the name it was tracked under (default "model"), the rest (optimizer, iterator) is left alone.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import tensorflow as tf

from savegame.errors import ConfigError, CorruptCheckpoint
from savegame.storage import CheckpointInfo, CheckpointStore, copy_checkpoint
from savegame.worker.adapter import CheckpointReader
from savegame.worker.weights import Which, choose_checkpoint, open_run


def load_weights(model: Any, path: str, which: Which = "best", *, name: str = "model",
                 monitor: Optional[str] = None, mode: Optional[str] = None,
                 storage_options: Optional[dict[str, Any]] = None) -> CheckpointInfo:
    """Read the tracked `name` of a run's checkpoint into `model`; returns the checkpoint used."""
    store = open_run(path, storage_options)
    info = choose_checkpoint(store, which, monitor, mode)
    if not store.is_local:  # TensorFlow reads files: a verified local copy first
        with tempfile.TemporaryDirectory(prefix="savegame-load-") as scratch:
            local = CheckpointStore(scratch)
            return _read(model, local, copy_checkpoint(store, info, local), name, info)
    return _read(model, store, info, name, info)


def _read(model: Any, store: CheckpointStore, local: CheckpointInfo, name: str, info: CheckpointInfo) -> CheckpointInfo:
    reader = CheckpointReader(store, local)
    state = reader.state.get("adapter", {})
    if name not in state.get("objects", []):
        raise ConfigError(f"{info.path} holds no object {name!r} (it holds {', '.join(state.get('objects', []))})")
    prefix = state.get("prefix", "tf/ckpt")
    files = [f.path for f in local.manifest.files if f.path.startswith(prefix + ".")]
    if not any(path.endswith(".index") for path in files):
        raise CorruptCheckpoint(f"{info.path}: no TensorFlow checkpoint ({prefix}.index) in the manifest")
    for path in files:
        reader.verified_local_path(path)
    try:
        status = tf.train.Checkpoint(**{name: model}).read(os.path.join(local.path, prefix))
        status.expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError, tf.errors.OpError) as exc:
        raise ConfigError(f"{info.path}: does not fit this model: {' '.join(str(exc).split())[:300]}") from None
    return info
