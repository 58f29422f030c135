"""Keras files built from host copies: what savegame writes into a checkpoint, and how it reads them.

`model.weights.h5` (and the `.keras` archive around it) is laid out by Keras' own saving walk, run
against a store that only records where each variable goes; the file is then written from the
captured host copies on the writer thread, each large dataset streamed straight from its buffer.
Keras' `model.load_weights` and `keras.models.load_model` read the result; savegame reads it back
with h5py, one read per dataset. Nothing here is ever unpickled.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import zipfile
from typing import Any, Iterator, Optional

import keras
import numpy as np

from savegame.errors import ConfigError
from savegame.storage.direct import DirectWrites

WEIGHTS_FILE = "model.weights.h5"
KERAS_FILE = "model.keras"
PAGE = 4096
STREAMED = 1 << 16  # datasets this large go from the host buffers straight to the file
Layout = list  # [(group path, group attributes, [(dataset name, variable or value)])]


# -- variables to host memory ---------------------------------------------------------------------

def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def host_array(variable: Any) -> np.ndarray:
    """A variable's current value as a NumPy array, without a copy where the backend allows."""
    value = getattr(variable, "value", variable)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        read = getattr(value, "value", None)  # tf.Variable.value(): the current tensor, shared (no copy)
        return np.asarray(read() if callable(read) else value)
    if backend == "torch":
        import torch
        t = value.detach()
        t = t if t.device.type == "cpu" else t.cpu()
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
        return t.numpy()
    return np.asarray(keras.ops.convert_to_numpy(value))


class HostBuffers:
    """One flat, page-aligned host buffer, reused from save to save while shapes and dtypes stay the
    same; every array starts on a page, so the writer can hand large ones to the disk as they are."""

    def __init__(self) -> None:
        self._flat: Optional[np.ndarray] = None
        self._layout: list[tuple[np.dtype, tuple[int, ...], int]] = []

    def copy(self, sources: list[np.ndarray]) -> list[np.ndarray]:
        layout, offset = [], 0
        for src in sources:
            layout.append((src.dtype, tuple(src.shape), offset))
            offset += -(-src.nbytes // PAGE) * PAGE
        if layout != self._layout or self._flat is None:
            self._flat = None  # free the old buffer before taking a new one
            raw = np.empty(max(offset, 1) + PAGE, dtype=np.uint8)
            start = -raw.ctypes.data % PAGE
            self._flat = raw[start:start + max(offset, 1)]
            self._layout = layout
        copies = []
        for src, (dtype, shape, start) in zip(sources, layout):
            dst = self._flat[start:start + src.nbytes].view(dtype).reshape(shape)
            np.copyto(dst, src, casting="no")
            copies.append(dst)
        return copies


# -- the Keras file layout, recorded by Keras' own saving walk -----------------------------------

def _saving_lib() -> Any:
    from keras.src.saving import saving_lib  # the walk behind model.save and save_weights
    return saving_lib


class _LayoutRecorder(_saving_lib().H5IOStore):  # type: ignore[misc]
    """Stands in for the HDF5 store during Keras' saving walk and records what would be written where."""

    def __init__(self) -> None:  # no file: nothing here touches the disk
        self.entries: list[tuple[str, Optional[dict], list[tuple[str, Any]]]] = []

    def __bool__(self) -> bool:
        return True

    def make(self, path: str, metadata: Optional[dict] = None) -> "_LayoutRecorder":
        self.entries.append((path, dict(metadata) if metadata else None, []))
        return self

    def __setitem__(self, key: str, value: Any) -> None:
        self.entries[-1][2].append((key, value))

    def close(self) -> None:
        pass


def record_layout(model: Any) -> list[tuple[str, Optional[dict], list[tuple[str, Any]]]]:
    """[(group path, group attributes, [(dataset name, variable or value)])] of model.save_weights()."""
    recorder = _LayoutRecorder()
    optimizer = getattr(model, "optimizer", None)
    # A Keras optimizer saves `enumerate(self.variables)` under "optimizer/vars", as copies: list its
    # variables here instead, unless its class saves itself some other way.
    plain = optimizer is not None and getattr(model, "_optimizer", optimizer) is optimizer and \
        type(optimizer).save_own_variables is keras.optimizers.Optimizer.save_own_variables
    _saving_lib()._save_state(model, weights_store=recorder, assets_store=None, inner_path="",
                              visited_saveables={id(optimizer)} if plain else set())
    if plain:
        recorder.entries.append(("optimizer", {"name": optimizer.name},
                                 [(str(i), v) for i, v in enumerate(optimizer.variables)]))
    return recorder.entries


def with_optimizer_variables(layout: list, model: Any) -> list:
    """Keras optimizers hand the saving walk copies (variable.numpy()), not their variables; put the
    variables back, so a capture copies them once, into the reusable buffers."""
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        return layout
    variables = list(optimizer.variables)
    out = []
    for path, metadata, items in layout:
        if ((metadata or {}).get("name") == optimizer.name and len(items) == len(variables)
                and all(isinstance(value, (np.ndarray, np.generic)) and key == str(i)
                        and np.shape(value) == tuple(v.shape)
                        for i, ((key, value), v) in enumerate(zip(items, variables)))):
            items = [(key, v) for (key, _value), v in zip(items, variables)]
        out.append((path, metadata, items))
    return out


def write_weights_h5(sink: Any, entries: list[tuple[str, Optional[dict], list[tuple[str, np.ndarray]]]]) -> None:
    """Write the recorded layout with the captured values, as Keras' H5IOStore would, into `sink`.

    HDF5 needs a seekable file, the checkpoint's sink is a stream: so the file's structure is made
    first in a sparse scratch file (large datasets allocated, page-aligned, but not written), then
    streamed out with each large dataset's bytes taken straight from the host buffers: every data
    byte is written once, and page-aligned runs can bypass the page cache.
    """
    import h5py

    fd, skeleton = tempfile.mkstemp(prefix="savegame-keras-", suffix=".h5")
    os.close(fd)
    try:
        placed: list[tuple[int, np.ndarray]] = []
        with h5py.File(skeleton, "w", alignment_threshold=STREAMED, alignment_interval=PAGE) as f:
            for group_path, metadata, items in entries:
                if not metadata and not items:
                    continue  # Keras creates a group lazily, on its first value
                group = f.create_group(group_path).create_group("vars") if group_path else f.create_group("vars")
                for key, value in (metadata or {}).items():
                    group.attrs[key] = value
                for key, array in items:
                    placed += _add_dataset(h5py, group, key, array)
        with open(skeleton, "rb") as structure, DirectWrites(sink) as out:
            _stream(structure, sorted(placed, key=lambda p: p[0]), out)
    finally:
        os.unlink(skeleton)


def _add_dataset(h5py: Any, group: Any, key: str, array: np.ndarray) -> list[tuple[int, np.ndarray]]:
    if array.dtype == numpy_dtype("bfloat16"):
        group.create_dataset(key, data=array).attrs["dtype"] = "bfloat16"
        return []
    if array.nbytes < STREAMED or array.dtype.kind not in "biuf" or not array.flags.c_contiguous:
        group[key] = array
        return []
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # its place in the file, now; its bytes, never
    dataset = group.create_dataset(key, shape=array.shape, dtype=array.dtype, dcpl=dcpl, fill_time="never")
    offset = dataset.id.get_offset()
    if offset is None:  # pragma: no cover - HDF5 did not allocate it: write it the usual way
        dataset[...] = array
        return []
    return [(offset, array)]


def _stream(structure: Any, placed: list[tuple[int, np.ndarray]], sink: Any) -> None:
    position = 0
    for offset, array in placed:
        if offset < position:
            raise RuntimeError("HDF5 placed two datasets on top of each other")  # pragma: no cover
        _copy_range(structure, position, offset - position, sink)
        sink.write(memoryview(array.reshape(-1).view(np.uint8)))
        position = offset + array.nbytes
    structure.seek(position)
    while chunk := structure.read(1 << 20):
        sink.write(chunk)


def _copy_range(source: Any, start: int, length: int, sink: Any) -> None:
    source.seek(start)
    while length > 0:
        chunk = source.read(min(length, 1 << 20))
        if not chunk:
            raise RuntimeError("the HDF5 structure file ended early")  # pragma: no cover
        sink.write(chunk)
        length -= len(chunk)


def read_weights(path: str, layout: list, where: str) -> Optional[list[tuple[Any, np.ndarray]]]:
    """(variable, value) for every variable of the layout, read from a Keras file that was verified
    already; None when the layout holds computed values (only Keras' loader can put those back).
    Reads each dataset once, straight into its array (Keras' loader copies it three times)."""
    import h5py

    if not all(isinstance(value, keras.Variable) for _p, _m, items in layout for _k, value in items):
        return None
    with open(path, "rb") as raw:
        base = _weights_offset(raw, path)
        if base is None:
            return None
        values = []
        with h5py.File(_Window(raw, base) if base else path, "r") as f:
            for group_path, _m, items in layout:
                if not items:
                    continue
                group = f.get(f"{group_path}/vars" if group_path else "vars")
                for key, variable in items:
                    dataset = group.get(key) if group is not None else None
                    if dataset is None or dataset.shape != tuple(variable.shape):
                        raise ConfigError(f"{where}: {group_path}/vars/{key} is missing or has another shape than "
                                          f"{variable.path} {list(variable.shape)}: saved by another model")
                    value = np.empty(dataset.shape, dtype=dataset.dtype)
                    if value.size:
                        dataset.read_direct(value)
                    if dataset.attrs.get("dtype") == "bfloat16":
                        value = value.astype(numpy_dtype("bfloat16"))
                    values.append((variable, value))
    return values


def _weights_offset(raw: Any, path: str) -> Optional[int]:
    """Where the HDF5 file starts: 0, or inside a `.keras` archive, its stored member's first byte."""
    if not path.endswith(".keras"):
        return 0
    with zipfile.ZipFile(raw) as archive:
        info = archive.getinfo(WEIGHTS_FILE)
    if info.compress_type != zipfile.ZIP_STORED:
        return None  # compressed (not written by savegame): Keras' loader
    raw.seek(info.header_offset)
    header = raw.read(30)
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


class _Window:
    """A read-only file object that starts `base` bytes into another one (an archive member)."""

    def __init__(self, raw: Any, base: int) -> None:
        self._raw, self._base = raw, base
        raw.seek(base)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            offset += self._base
        return self._raw.seek(offset, whence) - self._base

    def tell(self) -> int:
        return self._raw.tell() - self._base

    def read(self, size: int = -1) -> bytes:
        return self._raw.read(size)

    def readinto(self, buffer: Any) -> int:
        return self._raw.readinto(buffer)


class _Stream:
    """A write-only stream for zipfile (which also wants flush)."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def write(self, data: Any) -> int:
        return self._sink.write(data)

    def flush(self) -> None:
        pass


def write_keras_file(sink: Any, config_json: str, metadata_json: str, entries: list) -> None:
    """A `.keras` archive as `model.save` writes it (metadata, config, weights), streamed into `sink`."""
    with zipfile.ZipFile(_Stream(sink), "w") as archive:
        archive.writestr("metadata.json", metadata_json)
        archive.writestr("config.json", config_json)
        with archive.open(WEIGHTS_FILE, "w", force_zip64=True) as member:
            write_weights_h5(_Stream(member), entries)


def build_optimizer(model: Any) -> None:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(model.trainable_variables)


@contextlib.contextmanager
def tensorflow_hidden() -> Iterator[None]:
    """Keras imports TensorFlow, when it is installed, to check values against its types, whatever the
    backend; next to triton (the torch backend) TensorFlow crashes the process (tensorflow#124205).
    Inside this block, on other backends and while TensorFlow is not loaded, Keras sees none."""
    from keras.src.utils import module_utils

    lazy = getattr(module_utils, "tensorflow", None)
    hide = (keras.backend.backend() != "tensorflow" and "tensorflow" not in sys.modules
            and getattr(lazy, "_available", False) is None)
    if hide:
        lazy._available = False  # type: ignore[union-attr]
    try:
        yield
    finally:
        if hide:
            lazy._available = None  # type: ignore[union-attr]


def serialized_config(model: Any) -> tuple[str, str]:
    """The `.keras` config and metadata (cheap: no weights); refuses models Keras cannot serialize."""
    try:
        with tensorflow_hidden():
            return _saving_lib()._serialize_model_as_json(model)
    except Exception as exc:  # noqa: BLE001 - any serialization failure means the same thing
        raise ConfigError(f"the model cannot be saved as .keras ({type(exc).__name__}: {exc}); register its custom "
                          "objects, or use save_weights_only=True") from None
