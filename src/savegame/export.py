"""`savegame export`: one checkpoint's model as a file in its framework's own format.

- torch (and numpy): a `.safetensors` state_dict, keys as `model.state_dict()` names them, so
  `model.load_state_dict(safetensors.torch.load_file(FILE))` takes it as it is;
- Keras: the checkpoint's `.keras` archive, or its `.weights.h5` (taken out of the archive if need be);
- TensorFlow: a `tf.train.Checkpoint` prefix (FILE.index and FILE.data-*), read by
  `tf.train.Checkpoint(model=model).read(FILE).expect_partial()`.

Framework-free: the bytes are copied and re-framed, never loaded by a framework; every byte is
checked against the manifest on the way, and the file appears complete or not at all.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from typing import BinaryIO, Iterator, Optional

from savegame.errors import ConfigError, CorruptCheckpoint
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.storage.checksum import CHUNK, Hasher
from savegame.worker.adapter import CheckpointReader
from savegame.worker.safetensors_io import TensorBlob, TensorInfo, write_safetensors
from savegame.worker.weights import pick_module, read_module

KERAS_FILE, WEIGHTS_FILE = "model.keras", "model.weights.h5"


def export(store: CheckpointStore, info: CheckpointInfo, to: str, name: Optional[str] = None) -> str:
    """Write the model of checkpoint `info` to `to`; returns a short description of what was written."""
    framework = info.manifest.framework
    if framework in ("torch", "numpy"):
        return _export_safetensors(CheckpointReader(store, info), to, name)
    if framework == "keras":
        return _export_keras(store, info, to)
    if framework == "tensorflow":
        return _export_tensorflow(store, info, to)
    raise ConfigError(f"{info.path}: cannot export a checkpoint of framework {framework!r}")


def _export_safetensors(reader: CheckpointReader, to: str, name: Optional[str]) -> str:
    if not to.endswith(".safetensors"):
        raise ConfigError(f"--to {to}: a {reader.info.manifest.framework} model is exported as a .safetensors file")
    module = pick_module(reader, name)
    buffers: dict[str, memoryview] = {}

    def allocate(key: str, info: TensorInfo) -> memoryview:
        buffers[key] = memoryview(bytearray(info.nbytes))
        return buffers[key]

    tensors = read_module(reader, module, allocate)
    blobs = [TensorBlob(key, info.dtype, info.shape, buffers[key]) for key, info in tensors]
    with _atomic(to) as sink:
        write_safetensors(sink, blobs, metadata={"format": "pt", "savegame_step": str(reader.info.step)})
    return f"{module}'s state_dict, {len(blobs)} tensors"


def _export_keras(store: CheckpointStore, info: CheckpointInfo, to: str) -> str:
    held = {f.path for f in info.manifest.files}
    if to.endswith(".keras"):
        if KERAS_FILE not in held:
            raise ConfigError(f"{info.path} holds weights only (save_weights_only=True): export --to FILE.weights.h5")
        with _atomic(to) as sink:
            _copy_verified(store, info, KERAS_FILE, sink)
        return "the Keras model (.keras: architecture, weights, optimizer)"
    if not to.endswith(".weights.h5"):
        raise ConfigError(f"--to {to}: a Keras model is exported as FILE.keras or FILE.weights.h5")
    if WEIGHTS_FILE in held:
        with _atomic(to) as sink:
            _copy_verified(store, info, WEIGHTS_FILE, sink)
    else:
        with tempfile.TemporaryFile() as archive:
            _copy_verified(store, info, KERAS_FILE, archive)
            archive.seek(0)
            with zipfile.ZipFile(archive) as opened, opened.open(WEIGHTS_FILE) as member, _atomic(to) as sink:
                shutil.copyfileobj(member, sink, CHUNK)
    return "the Keras weights (.weights.h5)"


def _export_tensorflow(store: CheckpointStore, info: CheckpointInfo, to: str) -> str:
    prefix = CheckpointReader(store, info).state.get("adapter", {}).get("prefix", "tf/ckpt")
    files = [f.path for f in info.manifest.files if f.path.startswith(prefix + ".")]
    if not any(path.endswith(".index") for path in files):
        raise CorruptCheckpoint(f"{info.path}: no TensorFlow checkpoint ({prefix}.index) in the manifest")
    for path in files:
        with _atomic(to + path[len(prefix):]) as sink:
            _copy_verified(store, info, path, sink)
    return f"a tf.train.Checkpoint prefix ({len(files)} files: {to}.index, ...)"


def _copy_verified(store: CheckpointStore, info: CheckpointInfo, relpath: str, sink: BinaryIO) -> None:
    entry = next(f for f in info.manifest.files if f.path == relpath)
    hasher = Hasher()
    with store.open_file(info, relpath) as stream:
        while chunk := stream.read(CHUNK):
            hasher.update(chunk)
            sink.write(chunk)
    if (hasher.bytes, hasher.digest()) != (entry.bytes, entry.checksum):
        raise CorruptCheckpoint(f"{info.path}: {relpath}: checksum mismatch: the file was altered or damaged")


@contextlib.contextmanager
def _atomic(path: str) -> Iterator[BinaryIO]:
    """A file that appears at `path` only once it is written and on disk."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConfigError(f"--to {path}: the folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as sink:
            yield sink
            sink.flush()
            os.fsync(sink.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
