"""Writes captures in the background, one at a time (back-pressure: never more than one extra copy)."""
from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from savegame.storage import CheckpointInfo, CheckpointStore, StagedCheckpoint
from savegame.storage.checksum import CHUNK
from savegame.storage.direct import DIRECT_ALIGN, DIRECT_MIN, DirectWrites  # noqa: F401 - its writers' names
from savegame.storage.direct import yield_to_training
from savegame.worker.adapter import STATE_FILE, TENSORS_FILE, Capture
from savegame.worker.safetensors_io import write_safetensors

log = logging.getLogger("savegame.worker")


@dataclass(frozen=True)
class SaveJob:
    capture: Capture
    core_state: dict
    step: int
    epoch: int
    reason: str
    metrics: Mapping[str, float]
    framework: str
    run_id: str
    resumed_from: Optional[int]


def tensors_metadata(step: int) -> dict[str, str]:
    """The safetensors `__metadata__` of a checkpoint (every writer uses this: identical bytes)."""
    return {"format": "savegame", "step": str(step)}


def state_bytes(job: SaveJob) -> bytes:
    """state.json of a save: the core state and the adapter's (every writer uses this)."""
    return json.dumps({**job.core_state, "adapter": job.capture.state}).encode()


def write_checkpoint(store: CheckpointStore, job: SaveJob) -> CheckpointInfo:
    """Stage, write, commit. The capture's buffers are only read, never kept."""
    if job.capture.write is not None:
        return job.capture.write(store, job)
    staged = store.begin(job.step)
    try:
        with staged:
            with staged.open(TENSORS_FILE) as f, DirectWrites(f) as direct:
                write_safetensors(direct, job.capture.blobs, tensors_metadata(job.step),
                                  align=DIRECT_ALIGN, ready=job.capture.ready)
            staged.write_bytes(STATE_FILE, state_bytes(job))
            for relpath, source in job.capture.files.items():
                if callable(source):
                    with staged.open(relpath) as sink:
                        source(sink)  # writes the file's bytes in order; the sink checksums them
                else:
                    _copy_in(staged, relpath, source)
            return staged.commit(epoch=job.epoch, reason=job.reason, metrics=job.metrics,
                                 framework=job.framework, run_id=job.run_id, resumed_from=job.resumed_from)
    finally:
        if job.capture.cleanup is not None:
            job.capture.cleanup()


def _copy_in(staged: StagedCheckpoint, relpath: str, local: str) -> None:
    with open(local, "rb", buffering=0) as src, staged.open(relpath) as dst:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := src.readinto(view):
            dst.write(view[:n])


class BackgroundWriter:
    """One writer thread; `submit` first waits for the save in flight."""

    def __init__(self, store: CheckpointStore, on_done: Callable[[SaveJob, Optional[CheckpointInfo],
                                                                  Optional[BaseException]], None]) -> None:
        self._store = store
        self._on_done = on_done
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="savegame-writer",
                                        initializer=yield_to_training)
        self._inflight: Optional[Future[None]] = None
        self.inflight_step: Optional[int] = None
        self.last_persist_s: Optional[float] = None  # submit -> commit of the last save that committed

    def wait(self) -> None:
        if self._inflight is not None:
            self._inflight.result()
            self._inflight = None
            self.inflight_step = None

    def make_room(self) -> None:
        """Until the host buffers are free for the next capture: here, once the last save is written."""
        self.wait()

    def submit(self, job: SaveJob) -> None:
        self.wait()
        self.inflight_step = job.step
        self._inflight = self._pool.submit(self._run, job, time.monotonic())

    def _run(self, job: SaveJob, submitted: float) -> None:
        try:
            info = write_checkpoint(self._store, job)
        except BaseException as exc:  # reported to the training thread through on_done
            self._on_done(job, None, exc)
            return
        self.last_persist_s = time.monotonic() - submitted
        self._on_done(job, info, None)

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()

