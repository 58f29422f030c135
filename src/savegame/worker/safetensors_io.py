"""Streaming safetensors: write tensors straight from host buffers, read straight into destinations.

The format (8-byte little-endian header length, a JSON header, then raw bytes) is simple enough to
stream without the intermediate copies of `safetensors.save_file`, and the files stay loadable by
the `safetensors` package. Reads check the file's checksum as they go, hashing in a helper thread
so verification overlaps the read; nothing is ever unpickled.
"""
from __future__ import annotations

import ctypes
import json
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence

from savegame.errors import CorruptCheckpoint, UnsupportedFormat
from savegame.storage.checksum import Hasher

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 << 20
READ_CHUNK = 64 << 20
WRITE_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorBlob:
    """One tensor's bytes in host memory, ready to write."""

    name: str
    dtype: str  # safetensors dtype, e.g. "F32"
    shape: tuple[int, ...]
    data: memoryview  # C-contiguous bytes, len == prod(shape) * itemsize


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * ITEMSIZE[dtype]


def encode_header(blobs: Sequence[TensorBlob], metadata: Optional[dict[str, str]] = None, align: int = 8) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data starts at a multiple of `align`."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for blob in blobs:
        size = blob.data.nbytes
        if size != _nbytes(blob.dtype, blob.shape):
            raise ValueError(f"{blob.name}: {size} bytes do not match {blob.dtype}{list(blob.shape)}")
        header[blob.name] = {"dtype": blob.dtype, "shape": list(blob.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % max(align, 8))
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(sink: Any, blobs: Sequence[TensorBlob], metadata: Optional[dict[str, str]] = None,
                      align: int = 8, ready: Optional[Callable[[int], None]] = None) -> int:
    """Write a safetensors file to `sink` (anything with write); returns the bytes written.

    The data starts at a multiple of `align` in the file. Blobs that lie back to back in memory
    (one host buffer) go out as a few large writes of WRITE_CHUNK bytes, never copied. `ready(n)`,
    if given, is called before data bytes [0, n) are written (they may still be being copied).
    """
    header = encode_header(blobs, metadata, align)
    sink.write(header)
    done = 0
    for run in coalesce(blob.data for blob in blobs):
        for start in range(0, run.nbytes, WRITE_CHUNK):
            piece = run[start:start + WRITE_CHUNK]
            if ready is not None:
                ready(done + piece.nbytes)
            sink.write(piece)
            done += piece.nbytes
    return len(header) + done


def buffer_address(view: memoryview) -> Optional[int]:
    """Where a buffer's bytes are in memory (None when that cannot be told without copying)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only or empty
        return None


def coalesce(views: Iterable[memoryview]) -> Iterator[memoryview]:
    """The same bytes, with views that are adjacent in memory merged into one (the originals must stay alive)."""
    run: Optional[memoryview] = None
    run_start = run_end = None
    for view in views:
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        if view.nbytes == 0:
            continue
        start = buffer_address(view)
        if run is not None and start is not None and start == run_end:
            run_end = start + view.nbytes
            run = memoryview((ctypes.c_char * (run_end - run_start)).from_address(run_start)).cast("B")  # type: ignore[operator]
            continue
        if run is not None:
            yield run
        run, run_start = view, start
        run_end = None if start is None else start + view.nbytes
    if run is not None:
        yield run


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def parse_header(raw: bytes, where: str) -> tuple[list[TensorInfo], dict[str, str]]:
    try:
        header = json.loads(raw)
    except ValueError:
        raise CorruptCheckpoint(f"{where}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{where}: the safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    infos = []
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpoint(f"{where}: bad safetensors entry {name!r}") from None
        if dtype not in ITEMSIZE:
            raise UnsupportedFormat(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        if end - start != _nbytes(dtype, shape) or start < 0:
            raise CorruptCheckpoint(f"{where}: tensor {name!r} has inconsistent offsets")
        infos.append(TensorInfo(name, dtype, shape, int(start), int(end)))
    infos.sort(key=lambda i: i.start)
    expected = 0
    for info in infos:
        if info.start != expected:
            raise CorruptCheckpoint(f"{where}: safetensors data is not contiguous at {info.name!r}")
        expected = info.end
    return infos, metadata


class _BackgroundHasher:
    """Feeds chunks to a Hasher in order on a helper thread, so hashing overlaps reading."""

    def __init__(self) -> None:
        self.hasher = Hasher()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-hash")
        self._last: Optional[Future[None]] = None

    def update(self, chunk: memoryview) -> None:
        self._last = self._pool.submit(self.hasher.update, chunk)

    def digest(self) -> tuple[int, str]:
        if self._last is not None:
            self._last.result()
        self._pool.shutdown()
        return self.hasher.bytes, self.hasher.digest()


Allocate = Callable[[TensorInfo], memoryview]


def read_safetensors(stream: BinaryIO, allocate: Allocate, where: str,
                     expected: Optional[tuple[int, str]] = None,
                     check: Optional[Callable[[list[TensorInfo]], None]] = None) -> dict[str, str]:
    """Read every tensor into the buffer `allocate` returns for it; verify (bytes, checksum) if given.

    `check(infos)` sees the parsed header before any data is read (and may raise to refuse it).
    Returns the file's metadata. On a mismatch raises CorruptCheckpoint: the destinations then hold
    garbage, and the caller must not use them.
    """
    hashing = _BackgroundHasher()
    try:
        metadata = _read_all(stream, allocate, where, hashing, check)
        if stream.read(1):
            raise CorruptCheckpoint(f"{where}: the file is longer than its header says")
    finally:
        size, checksum = hashing.digest()
    if expected is not None and (size, checksum) != tuple(expected):
        raise CorruptCheckpoint(f"{where}: checksum mismatch: the file was altered or damaged")
    return metadata


def _read_all(stream: BinaryIO, allocate: Allocate, where: str, hashing: _BackgroundHasher,
              check: Optional[Callable[[list[TensorInfo]], None]] = None) -> dict[str, str]:
    prefix = _read_exact(stream, 8, where)
    hashing.update(memoryview(prefix))
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER:
        raise CorruptCheckpoint(f"{where}: the safetensors header claims {length} bytes; the file is damaged")
    raw = _read_exact(stream, length, where)
    hashing.update(memoryview(raw))
    infos, metadata = parse_header(raw, where)
    if check is not None:
        check(infos)
    for info in infos:
        dest = allocate(info)
        if dest.nbytes != info.nbytes:
            raise ValueError(f"{where}: destination for {info.name!r} has {dest.nbytes} bytes, needs {info.nbytes}")
        _read_into(stream, dest, hashing, where)
    return metadata


def _read_exact(stream: BinaryIO, n: int, where: str) -> bytes:
    data = bytearray(n)
    _fill(stream, memoryview(data), where)
    return bytes(data)


def _read_into(stream: BinaryIO, dest: memoryview, hashing: _BackgroundHasher, where: str) -> None:
    dest = dest.cast("B")
    for start in range(0, dest.nbytes, READ_CHUNK):
        chunk = dest[start:start + READ_CHUNK]
        _fill(stream, chunk, where)
        hashing.update(chunk)


def _fill(stream: BinaryIO, view: memoryview, where: str) -> None:
    filled = 0
    while filled < view.nbytes:
        n = stream.readinto(view[filled:])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpoint(f"{where}: the file ends early (truncated)")
        filled += n
