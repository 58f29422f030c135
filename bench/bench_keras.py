"""Keras checkpoint figures, savegame next to Keras' own ModelCheckpoint, printed as JSON.

    python bench/bench_keras.py                    # ~256 MB model (Dense 8192x8192) + Adam: ~768 MB of state
    python bench/bench_keras.py --quick            # ~16 MB, for a smoke run
    KERAS_BACKEND=torch python bench/bench_keras.py

The same model trains the same steps three times in one process: without checkpoints, with
SavegameCallback and with ModelCheckpoint, both saving every `--every` batches, both writing the
model and its optimizer (`model.weights.h5`, or `.keras` with --format keras). Figures:

  stall_ms                 time the training thread spends in the checkpoint callback at a save
                           (median over saves after the first; the first also allocates buffers)
  modelcheckpoint_vs_savegame_stall   ModelCheckpoint's stall / savegame's
  stall_vs_plain_copy      savegame's stall / one plain copy of the same bytes into preallocated memory
  steps_per_s              training throughput without checkpoints, with savegame, with ModelCheckpoint
  throughput_while_saving  steps/s with savegame / without (and the same for ModelCheckpoint)
  commit_vs_raw_write      a save until committed (not the first) / one raw sequential write + fsync
                           of its bytes
  restore_vs_raw_read      Checkpointer.restore() / one raw read of the checkpoint's files, both with
                           the files evicted from the page cache first

On a 2-core machine the background write competes with training for the CPUs; the JSON says how
many there were.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import keras
import numpy as np

from savegame.keras import SavegameCallback
from savegame.worker.checkpointer import Checkpointer
from savegame.worker.keras.format import host_array

TARGETS = {"stall_vs_plain_copy": ("<=", 1.25), "commit_vs_raw_write": ("<=", 1.25),
           "throughput_while_saving": (">=", 0.95), "restore_vs_raw_read": ("<=", 1.25)}


class StepClock(keras.callbacks.Callback):
    """Wall-clock time of every batch end (the interval between two includes every callback's stall)."""

    def __init__(self) -> None:
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self.ends.append(time.perf_counter())

    def steps_per_s(self, warmup: int = 2) -> float:
        ends = self.ends[warmup:]
        return (len(ends) - 1) / (ends[-1] - ends[0])


def timed(callback_class: type) -> type:
    class Timed(callback_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.calls: list[float] = []

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            start = time.perf_counter()
            super().on_train_batch_end(batch, logs)
            self.calls.append(time.perf_counter() - start)
    return Timed


def build(width: int, seed: int = 0) -> Any:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width, activation="relu"),
                              keras.layers.Dense(8)])
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="mse")
    return model


def fit(model: Any, data: tuple, batch: int, callbacks: list) -> StepClock:
    clock = StepClock()
    model.fit(*data, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[clock, *callbacks])
    return clock


def state_bytes(model: Any) -> int:
    return sum(host_array(v).nbytes for v in model.variables + model.optimizer.variables)


def plain_copy_s(model: Any, reps: int = 3) -> float:
    sources = [host_array(v) for v in model.variables + model.optimizer.variables]
    dest = np.empty(sum(s.nbytes for s in sources), dtype=np.uint8)
    dest.fill(0)  # preallocated and touched: the copy pays no page faults
    times = []
    for _ in range(reps):
        start, offset = time.perf_counter(), 0
        for src in sources:
            np.copyto(dest[offset:offset + src.nbytes].view(src.dtype).reshape(src.shape), src)
            offset += src.nbytes
        times.append(time.perf_counter() - start)
    return min(times)


def raw_write_s(path: str, nbytes: int) -> float:
    block = np.ones(8 << 20, dtype=np.uint8)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            n = min(left, block.nbytes)
            f.write(memoryview(block)[:n])
            left -= n
        os.fsync(f.fileno())
    return time.perf_counter() - start


def evict(path: str) -> None:
    """Drop one file's pages from the page cache (only this file: the machine is shared)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def raw_read_s(path: str) -> float:
    evict(path)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        data = bytearray(os.path.getsize(path))
        f.readinto(data)
    return time.perf_counter() - start


def savegame_run(args: argparse.Namespace, model: Any, data: tuple, root: str) -> tuple[StepClock, list[float]]:
    callback = timed(SavegameCallback)(os.path.join(root, "savegame"), save_freq=args.every, keep_last=2,
                                       save_weights_only=args.format == "weights", monitor="loss")
    clock = fit(model, data, args.batch, [callback])
    saves = [t for i, t in enumerate(callback.calls) if (i + 1) % args.every == 0]
    return clock, saves


def modelcheckpoint_run(args: argparse.Namespace, model: Any, data: tuple, root: str) -> tuple[StepClock, list[float]]:
    name = "mc.weights.h5" if args.format == "weights" else "mc.keras"
    callback = timed(keras.callbacks.ModelCheckpoint)(os.path.join(root, name), save_freq=args.every,
                                                      save_weights_only=args.format == "weights")
    clock = fit(model, data, args.batch, [callback])
    saves = [t for i, t in enumerate(callback.calls) if (i + 1) % args.every == 0]
    return clock, saves


def commit_and_restore(model: Any, root: str, weights_only: bool) -> dict[str, float]:
    """The second of two saves (the first also allocates the host buffers), from save() to committed;
    then a restore of it with nothing in the page cache, next to a raw read of the same bytes."""
    run = os.path.join(root, "commit")
    ckpt = Checkpointer(run, framework="keras", handle_signals=False, keep_last=1)
    ckpt.track(model=model)
    ckpt._adapter.save_weights_only = weights_only  # what SavegameCallback(save_weights_only=...) sets
    ckpt.save("manual", wait=True)
    ckpt.progress.step += 1
    start = time.perf_counter()
    ckpt.save("manual", wait=True)
    commit = time.perf_counter() - start
    ckpt.close()
    info = max(ckpt.store.list(), key=lambda c: c.step)
    raw = raw_write_s(os.path.join(root, "raw.bin"), info.bytes)
    files = [os.path.join(info.path, f.path) for f in info.manifest.files]
    read = sum(raw_read_s(path) for path in files)
    for path in files:
        evict(path)
    again = Checkpointer(run, framework="keras", handle_signals=False)
    again.track(model=model)
    start = time.perf_counter()
    again.restore()
    restore = time.perf_counter() - start
    again.close()
    return {"commit_s": commit, "raw_write_fsync_s": raw, "restore_s": restore, "raw_read_s": read,
            "checkpoint_bytes": info.bytes}


def one_rep(args: argparse.Namespace, model: Any, data: tuple, root: str) -> dict[str, Any]:
    """Every figure and its baseline, one after the other (the machine is shared and noisy)."""
    plain = fit(model, data, args.batch, [])
    sg_clock, sg_stalls = savegame_run(args, model, data, root)
    mc_clock, mc_stalls = modelcheckpoint_run(args, model, data, root)
    copy_s = plain_copy_s(model)
    io = commit_and_restore(model, root, args.format == "weights")
    for name in ("savegame", "commit"):
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    sg_stall = statistics.median(sg_stalls[1:] or sg_stalls)
    mc_stall = statistics.median(mc_stalls[1:] or mc_stalls)
    return {
        "stall_ms": {"savegame": sg_stall * 1e3, "modelcheckpoint": mc_stall * 1e3, "plain_copy": copy_s * 1e3,
                     "savegame_first": sg_stalls[0] * 1e3, "modelcheckpoint_first": mc_stalls[0] * 1e3},
        "steps_per_s": {"no_checkpoints": plain.steps_per_s(), "savegame": sg_clock.steps_per_s(),
                        "modelcheckpoint": mc_clock.steps_per_s()},
        "io_s": io,
        "figures": {"stall_vs_plain_copy": sg_stall / copy_s,
                    "modelcheckpoint_vs_savegame_stall": mc_stall / sg_stall,
                    "commit_vs_raw_write": io["commit_s"] / io["raw_write_fsync_s"],
                    "throughput_while_saving": sg_clock.steps_per_s() / plain.steps_per_s(),
                    "modelcheckpoint_throughput_while_saving": mc_clock.steps_per_s() / plain.steps_per_s(),
                    "restore_vs_raw_read": io["restore_s"] / io["raw_read_s"]},
    }


def medians(reps: list[dict[str, Any]]) -> dict[str, Any]:
    return {group: {k: round(statistics.median(r[group][k] for r in reps), 3) for k in reps[0][group]}
            for group in reps[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=256, help="model size in MB (weights only)")
    p.add_argument("--quick", action="store_true", help="a 16 MB model, one repetition, for a smoke run")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--every", type=int, default=4, help="save every N batches")
    p.add_argument("--reps", type=int, default=3, help="repetitions; the JSON holds the medians")
    p.add_argument("--format", choices=("weights", "keras"), default="weights")
    p.add_argument("--dir", help="scratch folder (default: a temp folder, removed afterwards)")
    args = p.parse_args()
    if args.quick:
        args.mb, args.reps = 16, 1
    width = int(math.sqrt(args.mb * (1 << 20) / 4))
    root = tempfile.mkdtemp(prefix="bench-keras-", dir=args.dir)
    try:
        rng = np.random.default_rng(0)
        data = (rng.normal(size=(args.batch * args.steps, width)).astype("float32"),
                rng.normal(size=(args.batch * args.steps, 8)).astype("float32"))
        model = build(width)
        fit(model, data, args.batch, [])  # warm-up: compiles, builds Adam's slots
        reps = [one_rep(args, model, data, root) for _ in range(args.reps)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "backend": keras.backend.backend(), "keras": keras.__version__, "format": args.format,
        "cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
        "load_average": os.getloadavg()[0],
        "model_weights_mb": round(sum(host_array(v).nbytes for v in model.weights) / 2**20, 1),
        "state_mb": round(state_bytes(model) / 2**20, 1), "batch": args.batch, "steps": args.steps,
        "save_every_steps": args.every, "repetitions": args.reps, **medians(reps),
    }
    result["targets_met"] = {k: (result["figures"][k] <= v if op == "<=" else result["figures"][k] >= v)
                             for k, (op, v) in TARGETS.items()}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
