"""Host buffers for torch saves: one reusable, page-aligned buffer that the copy fills and the
writer follows, chunk by chunk (pinned memory when the state is on a GPU)."""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Optional

import numpy
import torch

from savegame.errors import ConfigError
from savegame.worker.adapter import Reservation, Reserve
from savegame.worker.safetensors_io import TensorBlob, TensorSpec

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
          torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64"}
TORCH_DTYPES = {v: k for k, v in DTYPES.items()}
PAGE = 4096
COPY_CHUNK = 8 << 20
# The ranks torchrun starts on one node share its cores: each copies with its share of them.
_LOCAL_RANKS = os.environ.get("LOCAL_WORLD_SIZE", "")
COPY_THREADS = max(1, min(4, (os.cpu_count() or 1) // (int(_LOCAL_RANKS) if _LOCAL_RANKS.isdigit() and
                                                       int(_LOCAL_RANKS) > 0 else 1)))
PARALLEL_MIN = 4 << 20  # below this, one thread copies


def bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's memory."""
    return t.reshape(-1).view(torch.uint8)


class HostBuffers:
    """One flat host buffer, reused from save to save while the state's layout stays the same.

    Tensors lie back to back in file order, from a page-aligned start: the writer sends the whole
    buffer to disk in a few large writes that can bypass the page cache (see writer.py). CPU
    tensors are copied by a few threads at once (the training thread waits anyway, and the writer
    is idle: back-pressure), GPU tensors by asynchronous device-to-host copies into pinned memory.
    """

    def __init__(self) -> None:
        self._flat: Optional[torch.Tensor] = None
        self._pinned = False
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
        self._pool: Optional[ThreadPoolExecutor] = None

    def copy(self, tensors: dict[str, torch.Tensor]) -> list[TensorBlob]:
        """Copy everything now; the blobs point into the host buffer."""
        blobs, fill, _ready, _reserved = self.plan(tensors)
        fill()
        return blobs

    def plan(self, tensors: dict[str, torch.Tensor], reserve: Optional[Reserve] = None
             ) -> tuple[list[TensorBlob], Callable[[], None], Callable[[int], None], Optional[Reservation]]:
        """Lay the tensors out in the host buffer; return (blobs, fill, ready, reserved): `fill()` does
        the copy (on the training thread), `ready(n)` waits until the first n bytes are copied (the
        writer). With `reserve`, CPU tensors go into the memory it lends (`reserved`, a shared-memory
        segment) instead, and no host buffer is kept; GPU tensors keep the pinned buffer."""
        layout, offset = [], 0
        # Tensors whose sizes are multiples of 64 bytes first: the big copies then all start aligned
        # (a memcpy to a misaligned destination runs up to ~1.5x slower); the odd scalars go last.
        for name in sorted(tensors, key=lambda n: _nbytes(tensors[n]) % 64 != 0):
            t = tensors[name]
            if t.dtype not in DTYPES:
                raise ConfigError(f"{name}: tensors of dtype {t.dtype} cannot be saved")
            layout.append((name, t.dtype, tuple(t.shape), offset, _nbytes(t)))
            offset += _nbytes(t)
        on_gpu = any(t.device.type == "cuda" for t in tensors.values())
        on_cpu = all(t.device.type == "cpu" for t in tensors.values())
        reserved = None
        if reserve is not None and on_cpu and offset:  # the blobs' order is the file's: ask in it
            reserved = reserve([TensorSpec(name, DTYPES[dtype], shape) for name, dtype, shape, _, _ in layout])
        if reserved is not None:
            self._flat, self._layout = None, []  # the segment is the copy: no host buffer besides it
            dest = torch.frombuffer(reserved.data, dtype=torch.uint8)
        else:
            if layout != self._layout or self._flat is None or self._pinned != on_gpu:
                self._flat = None  # free the old buffer before taking a new one
                self._flat = host_empty(offset, pin=on_gpu)
                self._layout, self._pinned = layout, on_gpu
            dest = self._flat
        flat = dest.numpy()
        blobs = [TensorBlob(name, DTYPES[dtype], shape, memoryview(flat[start:start + size]))
                 for name, dtype, shape, start, size in layout]
        progress = CopyProgress()
        return blobs, lambda: self._fill(dest, tensors, layout, progress), progress.wait_for, reserved

    def _fill(self, dest: torch.Tensor, tensors: dict[str, torch.Tensor], layout: list,
              progress: "CopyProgress") -> None:
        flat = dest.numpy()
        try:
            pieces = []
            for name, _dtype, _shape, start, size in layout:
                src = tensors[name].detach()
                if not src.is_contiguous():
                    src = src.contiguous()
                if src.device.type == "cpu":
                    pieces.append((flat[start:start + size], bytes_view(src).numpy()))
                else:
                    dest[start:start + size].copy_(bytes_view(src), non_blocking=True)
            on_gpu = len(pieces) < len(layout)
            # With GPU tensors in the layout, the writer waits for everything (one synchronize);
            # CPU-only, it follows the copy chunk by chunk.
            self._copy_cpu(flat, pieces, None if on_gpu else progress)
            if on_gpu:
                torch.cuda.synchronize()
            progress.done_all()
        except BaseException as exc:
            progress.fail(exc)
            raise

    def _copy_cpu(self, flat: numpy.ndarray, pieces: list[tuple[numpy.ndarray, numpy.ndarray]],
                  progress: Optional["CopyProgress"]) -> None:
        """memcpy (numpy.copyto, ~2x torch's copy_ here) in COPY_CHUNK pieces, by this thread and
        helpers that each take the next piece (a helper on a busy core does not hold the others up).
        Pieces go in file order, and each reports when it is done, so the writer can follow."""
        flat_start = flat.ctypes.data
        chunks = [(dst[i:i + COPY_CHUNK], src[i:i + COPY_CHUNK])
                  for dst, src in pieces for i in range(0, max(dst.nbytes, 1), COPY_CHUNK)]
        if progress is not None:
            progress.expect([(dst.ctypes.data - flat_start, dst.nbytes) for dst, _ in chunks])
        order = iter(enumerate(chunks))
        total = sum(dst.nbytes for dst, _ in pieces)
        helpers = min(COPY_THREADS, total // PARALLEL_MIN) - 1
        if helpers < 1:
            _copy_from(order, None, progress)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COPY_THREADS - 1, thread_name_prefix="savegame-copy")
        lock = threading.Lock()
        running = [self._pool.submit(_copy_from, order, lock, progress) for _ in range(helpers)]
        _copy_from(order, lock, progress)
        for future in running:
            future.result()


class CopyProgress:
    """Which bytes of the host buffer are copied: the writer waits on it, the copiers report to it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._chunks: list[tuple[int, int]] = []  # (offset, size) of each chunk, in file order
        self._done: list[bool] = []
        self._next = 0  # chunks [0, _next) are all done
        self._ready_bytes = 0
        self._all = False
        self._error: Optional[BaseException] = None

    def expect(self, chunks: list[tuple[int, int]]) -> None:
        with self._cond:
            self._chunks, self._done = chunks, [False] * len(chunks)

    def chunk_done(self, index: int) -> None:
        with self._cond:
            self._done[index] = True
            while self._next < len(self._done) and self._done[self._next]:
                offset, size = self._chunks[self._next]
                self._ready_bytes = offset + size
                self._next += 1
            self._cond.notify_all()

    def done_all(self) -> None:
        with self._cond:
            self._all = True
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            self._error = exc
            self._cond.notify_all()

    def wait_for(self, nbytes: int) -> None:
        with self._cond:
            while not self._all and self._ready_bytes < nbytes and self._error is None:
                self._cond.wait()
            if self._error is not None:
                raise RuntimeError(f"the copy into the host buffer failed: {self._error}")


def _copy_from(chunks: Iterator[tuple[int, tuple[numpy.ndarray, numpy.ndarray]]], lock: Optional[threading.Lock],
               progress: Optional[CopyProgress]) -> None:
    while True:
        with lock or contextlib.nullcontext():
            item = next(chunks, None)
        if item is None:
            return
        index, pair = item
        numpy.copyto(*pair)  # releases the GIL for large copies
        if progress is not None:
            progress.chunk_done(index)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def host_empty(size: int, pin: bool = False) -> torch.Tensor:
    """An uninitialised uint8 host tensor of `size` bytes starting on a PAGE boundary."""
    raw = torch.empty(size + PAGE, dtype=torch.uint8, pin_memory=pin)
    skip = -raw.data_ptr() % PAGE
    return raw[skip:skip + size]
