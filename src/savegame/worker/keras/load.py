"""Reading savegame checkpoints with Keras' own tools, after checking them.

    model = savegame.keras.load_model("checkpoints", which="best")     # keras.models.load_model, safe_mode=True
    savegame.keras.load_weights(model, "checkpoints/ckpt-000000001200")  # model.load_weights

A file is handed to Keras only if a committed checkpoint's manifest lists it and its checksum
matches: tampered and foreign files are refused before Keras opens them.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import keras

from savegame.errors import ConfigError, CorruptCheckpoint, UnsupportedFormat
from savegame.storage import CheckpointStore
from savegame.worker.adapter import CheckpointReader
from savegame.worker.keras.format import KERAS_FILE, WEIGHTS_FILE, build_optimizer, tensorflow_hidden


def checkpoint_file(path: str, which: Union[str, int] = "latest", monitor: Optional[str] = None,
                    mode: str = "auto") -> str:
    """The verified local path of the Keras file in a checkpoint.

    `path`: a run folder (then `which` is "latest", "best" or a step), a checkpoint folder, or a
    `.keras`/`.weights.h5` file inside one. The file must be listed in a committed checkpoint's
    manifest and match its checksum: a tampered or foreign file raises CorruptCheckpoint.
    """
    path = os.path.abspath(path)
    if os.path.isfile(path):
        folder, name = os.path.dirname(path), os.path.basename(path)
        found = _committed_folder(folder)
        if found is None:
            raise CorruptCheckpoint(f"{path}: not in a committed savegame checkpoint (no manifest lists it): "
                                    "refusing a foreign file")
        store, info = found
    else:
        name = None
        store, info = _committed_folder(path) or _choose_in_run(path, which, monitor, mode)
    reader = CheckpointReader(store, info)
    if name is None:
        name = KERAS_FILE if reader.has(KERAS_FILE) else WEIGHTS_FILE
    if not reader.has(name):
        raise CorruptCheckpoint(f"{info.path}: {name} is not part of this savegame checkpoint (its manifest does "
                                "not list it): refusing a foreign file")
    return reader.verified_local_path(name)


def _committed_folder(path: str) -> Optional[tuple[CheckpointStore, Any]]:
    parent = CheckpointStore(os.path.dirname(path))
    for info in parent.list():
        if info.name == os.path.basename(path):
            return parent, info
    return None


def _choose_in_run(path: str, which: Union[str, int], monitor: Optional[str], mode: str) -> tuple:
    """"best" by `monitor` (else the run's stored policy), "latest", or a step (see worker/weights)."""
    from savegame.worker.weights import choose_checkpoint

    if os.path.exists(os.path.join(path, "manifest.json")):
        raise CorruptCheckpoint(f"{path}: its manifest is unreadable or damaged: not a committed savegame checkpoint")
    store = CheckpointStore(path)
    if not store.list():
        raise CorruptCheckpoint(f"{path} holds no committed savegame checkpoint")
    return store, choose_checkpoint(store, which, monitor, None if mode == "auto" and monitor is None else mode)


def load_weights(model: Any, path: str, which: Union[str, int] = "latest", monitor: Optional[str] = None,
                 mode: str = "auto") -> str:
    """`model.load_weights` from a verified savegame checkpoint; returns the file loaded."""
    file = checkpoint_file(path, which, monitor, mode)
    build_optimizer(model)
    model.load_weights(file)
    return file


def load_model(path: str, which: Union[str, int] = "latest", monitor: Optional[str] = None, mode: str = "auto",
               custom_objects: Optional[dict] = None, compile: bool = True) -> Any:
    """`keras.models.load_model(..., safe_mode=True)` from a verified savegame checkpoint.

    Tampered files fail the checksum (CorruptCheckpoint); files that Keras' safe mode refuses
    (Python lambdas, arbitrary code) raise UnsupportedFormat. Nothing is unpickled.
    """
    file = checkpoint_file(path, which, monitor, mode)
    if not file.endswith(".keras"):
        raise ConfigError(f"{file} holds weights only: build the model and use load_weights(model, ...)")
    try:
        with tensorflow_hidden():
            return keras.models.load_model(file, custom_objects=custom_objects, compile=compile, safe_mode=True)
    except Exception as exc:  # noqa: BLE001 - Keras raises ValueError/TypeError for refused configs
        raise UnsupportedFormat(f"{file}: Keras refused to load it in safe mode: {type(exc).__name__}: "
                                f"{str(exc)[:300]}") from None
