"""NumPy adapter: training state held in NumPy arrays (hand-written loops, JAX via NumPy, tests).

Tracked arrays are restored in place, so references the script holds stay valid. Nested dicts and
lists of arrays and plain values work too (restored by `ckpt.tracked(name)`).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from savegame.errors import ConfigError, CorruptCheckpoint, UnsupportedFormat
from savegame.worker.adapter import Capture, CheckpointReader, Reservation, Reserve
from savegame.worker.codec import Encoder, decode
from savegame.worker.safetensors_io import TensorBlob, TensorInfo, TensorSpec

DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.uint16): "U16",
          np.dtype(np.uint32): "U32", np.dtype(np.uint64): "U64", np.dtype(np.bool_): "BOOL"}
NP_DTYPES = {v: k for k, v in DTYPES.items()}


class NumpyAdapter:
    framework = "numpy"

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._buffers: dict[str, np.ndarray] = {}

    def add(self, **objects: Any) -> None:
        self.objects.update(objects)

    def capture(self) -> Capture:
        """Copies into reusable buffers: training may change the arrays while they are written."""
        return self._capture(self._copy)

    def capture_into(self, reserve: Optional[Reserve]) -> Capture:
        """capture(), copying into the memory `reserve` lends (a shared-memory segment) when it does."""
        return self._capture(self._copy, reserve)

    def capture_in_place(self) -> Capture:
        """The arrays' own memory, for a save that training waits out (emergency, final)."""
        return self._capture(lambda name, array: np.ascontiguousarray(array))

    def _capture(self, host: Callable[[str, np.ndarray], np.ndarray], reserve: Optional[Reserve] = None) -> Capture:
        encoder = Encoder(lambda x: isinstance(x, np.ndarray))
        skeleton = {name: encoder.encode(obj, name) for name, obj in self.objects.items()}
        arrays = encoder.tensors
        for name, array in arrays.items():
            if array.dtype not in DTYPES:
                raise ConfigError(f"{name}: arrays of dtype {array.dtype} cannot be saved")
        reserved = None
        if reserve is not None and sum(array.nbytes for array in arrays.values()):
            reserved = reserve([TensorSpec(name, DTYPES[a.dtype], tuple(a.shape)) for name, a in arrays.items()])
        if reserved is not None:
            self._buffers.clear()  # the segment is the copy: no buffers besides it
            host = _placer(reserved)
        blobs = []
        for name, array in arrays.items():
            data = host(name, array)
            blobs.append(TensorBlob(name, DTYPES[array.dtype], array.shape, memoryview(data.reshape(-1).view(np.uint8))))
        return Capture(blobs=blobs, state={"objects": skeleton}, reserved=reserved)

    def _copy(self, name: str, array: np.ndarray) -> np.ndarray:
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != array.shape or buffer.dtype != array.dtype:
            buffer = self._buffers[name] = np.empty_like(array, order="C")
        np.copyto(buffer, array)
        return buffer

    def restore(self, reader: CheckpointReader) -> None:
        saved = reader.state.get("adapter", {}).get("objects", {})
        live = {name: obj for name, obj in self.objects.items() if isinstance(obj, np.ndarray)}
        loaded: dict[str, np.ndarray] = {}

        def check(infos: list[TensorInfo]) -> None:  # before any byte is read
            for info in infos:
                target = live.get(info.name)
                if target is not None and (target.shape != info.shape or DTYPES.get(target.dtype) != info.dtype):
                    raise ConfigError(f"{reader.info.path}: array {info.name} is {info.dtype}{list(info.shape)}, the "
                                      f"script's is {DTYPES.get(target.dtype, target.dtype)}{list(target.shape)}: "
                                      "the checkpoint does not fit this model")
                if info.dtype not in NP_DTYPES:
                    raise UnsupportedFormat(f"{reader.info.path}: array {info.name} has dtype {info.dtype}, "
                                            "which NumPy does not hold")

        def allocate(info: TensorInfo) -> memoryview:
            target = live.get(info.name)
            if target is None or target.shape != info.shape or target.dtype != NP_DTYPES[info.dtype] \
                    or not target.flags.c_contiguous:
                target = np.empty(info.shape, dtype=NP_DTYPES[info.dtype])
            loaded[info.name] = target
            return memoryview(target.reshape(-1).view(np.uint8))

        reader.read_tensors(allocate, check)

        def tensor(name: str) -> np.ndarray:
            if name not in loaded:
                raise CorruptCheckpoint(f"{reader.info.path}: array {name!r} is missing")
            return loaded[name]

        for name in self.objects:
            if name not in saved:
                raise ConfigError(f"{reader.info.path} holds no state for {name!r}")
            value = decode(saved[name], tensor)
            current = self.objects[name]
            if isinstance(current, np.ndarray) and value is not current:
                if current.shape != value.shape:
                    raise ConfigError(f"{name}: the checkpoint holds shape {value.shape}, the script {current.shape}")
                np.copyto(current, value)
            else:
                self.objects[name] = value

    def tracked(self, name: str) -> Any:
        return self.objects[name]


def _placer(reserved: Reservation) -> Callable[[str, np.ndarray], np.ndarray]:
    """Copies each array into the next bytes of the reserved memory (the arrays come in file order)."""
    flat = np.frombuffer(reserved.data, dtype=np.uint8)
    at = 0

    def place(name: str, array: np.ndarray) -> np.ndarray:
        nonlocal at
        dest = flat[at:at + array.nbytes].view(array.dtype).reshape(array.shape)
        at += array.nbytes
        np.copyto(dest, array)
        return dest

    return place
