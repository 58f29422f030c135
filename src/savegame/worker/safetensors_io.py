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

from savegame.errors import CorruptCheckpoint, MalformedInput, UnsupportedFormat
from savegame.storage.checksum import Hasher
from savegame.storage.direct import buffer_address
from savegame.untrusted import MAX_SAFE_INT, integer, load_json

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 << 20
HEADER_DEPTH = 3  # {name: {"shape": [...]}}
MAX_DIMS = 64
READ_CHUNK = 64 << 20
WRITE_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorBlob:
    """One tensor's bytes in host memory, ready to write."""

    name: str
    dtype: str  # safetensors dtype, e.g. "F32"
    shape: tuple[int, ...]
    data: memoryview  # C-contiguous bytes, len == prod(shape) * itemsize

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be saved, before its bytes exist anywhere: what a header is made from."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.shape)


def _nbytes(dtype: str, shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count * ITEMSIZE[dtype]


def encode_header(blobs: Sequence[TensorBlob | TensorSpec], metadata: Optional[dict[str, str]] = None,
                  align: int = 8) -> bytes:
    """The 8-byte length and the JSON header, padded with spaces so the data starts at a multiple of `align`.
    The data follows in the order given, back to back."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for blob in blobs:
        size = blob.nbytes
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


def parse_header(raw: bytes, where: str, data_bytes: Optional[int] = None) -> tuple[list[TensorInfo], dict[str, str]]:
    """The tensors a safetensors header describes, checked before any of their bytes is read.

    Bounded JSON (size, nesting) with strict types: each entry exactly dtype, shape and data_offsets;
    the offsets tile the data section (no gap, no overlap, nothing past its `data_bytes`, when known);
    `__metadata__` an object of strings. What fails is a CorruptCheckpoint naming the tensor.
    """
    try:
        header = load_json(raw, what=f"{where}: the safetensors header", max_bytes=MAX_HEADER,
                           max_depth=HEADER_DEPTH)
    except MalformedInput as exc:
        raise CorruptCheckpoint(str(exc)) from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{where}: the safetensors header is not an object")
    metadata = _metadata(header.pop("__metadata__", {}), where)
    infos = sorted((_entry(name, value, where) for name, value in header.items()), key=lambda i: (i.start, i.end))
    expected, previous = 0, "the header"
    for info in infos:
        if info.start != expected:
            problem = "overlap those of" if info.start < expected else "leave a gap after"
            raise CorruptCheckpoint(f"{where}: the data_offsets of tensor {info.name!r} {problem} {previous!r}")
        expected, previous = info.end, info.name
    if data_bytes is not None and expected != data_bytes:
        last = infos[-1].name if infos else "(none)"
        where_it_ends = "beyond the end of the file" if expected > data_bytes else "short of the end of the file"
        raise CorruptCheckpoint(f"{where}: the data of tensor {last!r} ends {where_it_ends} "
                                f"({expected} bytes of data, the file holds {data_bytes})")
    return infos, metadata


def _metadata(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CorruptCheckpoint(f"{where}: the safetensors __metadata__ must be an object of strings")
    return value


_SHAPE_DIM = integer(0, MAX_SAFE_INT)
_OFFSET = integer(0, MAX_SAFE_INT)


def _entry(name: str, value: Any, where: str) -> TensorInfo:
    what = f"{where}: tensor {name[:200]!r}"
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpoint(f"{what}: an entry must hold exactly dtype, shape and data_offsets")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise UnsupportedFormat(f"{what} has unsupported dtype {str(dtype)[:20]!r}")
    try:
        if not isinstance(shape, list) or len(shape) > MAX_DIMS:
            raise ValueError(f"must be a list of at most {MAX_DIMS} sizes")
        dims = tuple(_SHAPE_DIM(d) for d in shape)
    except (ValueError, TypeError) as exc:
        raise CorruptCheckpoint(f"{what}: shape {exc}") from None
    try:
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise ValueError("must be [start, end]")
        start, end = (_OFFSET(o) for o in offsets)
    except (ValueError, TypeError) as exc:
        raise CorruptCheckpoint(f"{what}: data_offsets {exc}") from None
    if end - start != _nbytes(dtype, dims):
        raise CorruptCheckpoint(f"{what}: data_offsets [{start}, {end}] do not hold {dtype}{list(dims)}")
    return TensorInfo(name, dtype, dims, start, end)


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
        metadata = _read_all(stream, allocate, where, hashing, check, None if expected is None else int(expected[0]))
        if stream.read(1):
            raise CorruptCheckpoint(f"{where}: the file is longer than its header says")
    finally:
        size, checksum = hashing.digest()
    if expected is not None and (size, checksum) != tuple(expected):
        raise CorruptCheckpoint(f"{where}: checksum mismatch: the file was altered or damaged")
    return metadata


def _read_all(stream: BinaryIO, allocate: Allocate, where: str, hashing: _BackgroundHasher,
              check: Optional[Callable[[list[TensorInfo]], None]] = None,
              file_bytes: Optional[int] = None) -> dict[str, str]:
    prefix = _read_exact(stream, 8, where)
    hashing.update(memoryview(prefix))
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER or (file_bytes is not None and 8 + length > file_bytes):
        raise CorruptCheckpoint(f"{where}: the safetensors header claims {length} bytes; the file is damaged")
    raw = _read_exact(stream, length, where)
    hashing.update(memoryview(raw))
    infos, metadata = parse_header(raw, where, None if file_bytes is None else file_bytes - 8 - length)
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
