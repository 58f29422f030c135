"""PyTorch checkpoint figures, measured side by side and printed as JSON.

    python bench/bench_torch.py                  # ~1 GiB: ~90M fp32 params + Adam's two moments, on the CPU
    python bench/bench_torch.py --quick          # ~50 MB, for a smoke run
    python bench/bench_torch.py --device cuda    # the same on a GPU (stall vs a pinned device-to-host copy)

Every repetition measures each figure and its baseline one after the other (the machine is noisy),
and the JSON reports the median of the per-repetition ratios next to the design's targets:

  stall_vs_plain_copy        time the training thread is blocked in save() / one memcpy of the same
                             number of bytes into preallocated host memory (pinned device-to-host
                             copy on a GPU)
  torch_save_vs_stall        synchronous torch.save of the same state (fsync not timed) / the stall
  commit_vs_raw_write        save() until the manifest is in place / the faster of a buffered and an
                             O_DIRECT sequential write + fsync of the same bytes
  throughput_while_saving    training steps/s for the steps that start while a checkpoint persists /
                             steps/s of as many steps right after, with nothing in flight
  restore_vs_raw_read        Checkpointer.restore() (new Checkpointer, same model and optimizer) / one
                             raw read of the checkpoint's files into newly allocated memory

`other_ratios` holds stricter or looser variants (a two-thread copy, a read into preallocated
memory, the time until retention is applied too). Reads come from the page cache (the files were
just written); nothing here is ever unpickled.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy
import torch
from torch import nn

from savegame import Checkpointer

TARGETS = {"stall_vs_plain_copy": ("<=", 1.25), "torch_save_vs_stall": (">=", 20.0),
           "commit_vs_raw_write": ("<=", 1.25), "throughput_while_saving": (">=", 0.95),
           "restore_vs_raw_read": ("<=", 1.25)}


class Bench:
    def __init__(self, args: argparse.Namespace, root: str) -> None:
        self.device = torch.device(args.device)
        self.root = root
        torch.manual_seed(0)
        self.model = nn.Sequential(*[nn.Linear(args.hidden, args.hidden) for _ in range(args.layers)]).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(args.batch, args.hidden, device=self.device)
        self.train_step()  # Adam's moments exist from here on
        self.run_dir = os.path.join(root, "run")
        self.ckpt = self.checkpointer()
        self.state_bytes = sum(t.numel() * t.element_size() for t in self.tensors())
        self.src = torch.empty(self.state_bytes, dtype=torch.uint8, device=self.device).fill_(1)
        pinned = self.device.type == "cuda"
        self.dst = torch.empty(self.state_bytes + 8192, dtype=torch.uint8, pin_memory=pinned).fill_(0)  # preallocated
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1)
        self.aligned = self.dst[-self.dst.data_ptr() % 4096:][:self.state_bytes].numpy()
        self.dst = self.dst[:self.state_bytes]

    def checkpointer(self) -> Checkpointer:
        ckpt = Checkpointer(self.run_dir, keep_last=1, keep_best=0, every_epochs=0, handle_signals=False)
        return ckpt.track(model=self.model, optimizer=self.optimizer)

    def tensors(self) -> list[torch.Tensor]:
        out = list(self.model.state_dict().values())
        for state in self.optimizer.state.values():
            out += [v for v in state.values() if torch.is_tensor(v)]
        return out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        self.model(self.x).square().mean().backward()
        self.optimizer.step()
        self.sync()

    # -- the figures, one repetition each ---------------------------------------------------------

    def save_and_commit(self) -> tuple[float, float, float]:
        """(stall, save() to committed, save() to done: committed and retention applied)."""
        self.ckpt.step()
        manifest = os.path.join(self.run_dir, f"ckpt-{self.ckpt.progress.step:012d}", "manifest.json")
        self.sync()
        t0 = time.perf_counter()
        self.ckpt.save()  # returns once the state is copied; the write goes on in the background
        t1 = time.perf_counter()
        while not os.path.exists(manifest):  # committed: the manifest is in place
            time.sleep(0.0002)
        t2 = time.perf_counter()
        self.ckpt.save(wait=True)  # the same step: waits for the writer (retention runs after the commit)
        return t1 - t0, t2 - t0, time.perf_counter() - t0

    def plain_copy(self, threads: int = 1) -> float:
        """A plain copy of the same bytes into preallocated memory: one memcpy (or `threads` memcpys
        of equal parts at once) on the CPU, one pinned device-to-host copy on a GPU."""
        self.sync()
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            self.dst.copy_(self.src, non_blocking=True)
            self.sync()
        elif threads == 1:
            numpy.copyto(self.dst.numpy(), self.src.numpy())
        else:
            part = -(-self.state_bytes // threads)
            dst, src = self.dst.numpy(), self.src.numpy()
            list(self.pool.map(lambda i: numpy.copyto(dst[i:i + part], src[i:i + part]),
                               range(0, self.state_bytes, part)))
        return time.perf_counter() - t0

    def raw_write(self, direct: bool) -> float:
        """One sequential write + fsync of the same bytes from page-aligned memory (buffered or O_DIRECT)."""
        path = os.path.join(self.root, "raw.bin")
        size = self.state_bytes - self.state_bytes % 4096 if direct else self.state_bytes
        view = memoryview(self.aligned)[:size]
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
        try:
            for start in range(0, len(view), 64 << 20):
                os.write(fd, view[start:start + (64 << 20)])
            os.fsync(fd)
        finally:
            os.close(fd)
        elapsed = time.perf_counter() - t0
        os.unlink(path)
        return elapsed

    def torch_save(self) -> float:
        """Synchronous torch.save of the same state (to the page cache; the fsync is not timed)."""
        path = os.path.join(self.root, "torch_save.pt")
        self.sync()
        t0 = time.perf_counter()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, path)
        elapsed = time.perf_counter() - t0
        with open(path, "rb") as f:
            os.fsync(f.fileno())  # leave no dirty pages behind to slow the next measurement
        os.unlink(path)
        return elapsed

    def restore(self) -> float:
        t0 = time.perf_counter()
        ckpt = self.checkpointer()
        info = ckpt.restore()
        self.sync()
        elapsed = time.perf_counter() - t0
        ckpt.close()
        assert info is not None and info.step == self.ckpt.progress.step, "restored the wrong checkpoint"
        return elapsed

    def raw_read(self, into_new_memory: bool) -> float:
        """One raw read of the checkpoint's files, into new memory (as a restore must) or preallocated."""
        latest = self.ckpt.store.latest()
        assert latest is not None
        paths = [os.path.join(latest.path, f.path) for f in latest.manifest.files]
        t0 = time.perf_counter()
        offset = 0
        for path in paths:
            size = os.path.getsize(path)
            buf = torch.empty(size, dtype=torch.uint8) if into_new_memory else self.dst[offset:offset + size]
            offset += 0 if into_new_memory else size
            view, filled = memoryview(buf.numpy()), 0
            with open(path, "rb", buffering=0) as f:
                while filled < len(view):
                    n = f.readinto(view[filled:filled + (64 << 20)])
                    if not n:
                        break
                    filled += n
            del buf
        return time.perf_counter() - t0

    def throughput(self, alone_first: bool, steps_alone: int) -> tuple[float, float, int]:
        """(steps/s for the steps that start while a checkpoint persists, steps/s without, steps in
        the busy window); the order alternates between repetitions so that drift cancels out."""
        idle = self.steps_per_s(steps_alone) if alone_first else 0.0
        self.ckpt.step()
        self.ckpt.save()
        writer = self.ckpt._writer  # private: is the save still in flight?
        t0, steps = time.perf_counter(), 0
        while steps == 0 or (writer._inflight is not None and not writer._inflight.done()):
            self.train_step()
            steps += 1
        busy = steps / (time.perf_counter() - t0)
        self.ckpt.save(wait=True)
        return busy, idle if alone_first else self.steps_per_s(steps), steps

    def steps_per_s(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.train_step()
        return steps / (time.perf_counter() - t0)


def settle() -> None:
    """Let the disk and the page cache calm down between measurements (untimed)."""
    os.sync()
    time.sleep(0.3)


def median_ratio(pairs: list[tuple[float, float]]) -> float:
    return statistics.median(a / b for a, b in pairs)


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = tempfile.mkdtemp(prefix="savegame-bench-", dir=args.tmp)
    try:
        bench = Bench(args, root)
        return measure(bench, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def measure(bench: Bench, args: argparse.Namespace) -> dict[str, Any]:
    bench.save_and_commit()  # warm-up: the host buffer is allocated and touched once
    bench.plain_copy()
    samples: dict[str, list[float]] = {k: [] for k in (
        "stall", "committed", "done", "plain_copy", "plain_copy_threads", "raw_write_buffered", "raw_write_direct",
        "torch_save", "restore", "raw_read_new_memory", "raw_read_preallocated")}
    for _ in range(args.reps):
        # The plain copies sandwich the save: both see the machine in the same state.
        before = bench.plain_copy()
        for name, value in zip(("stall", "committed", "done"), bench.save_and_commit()):
            samples[name].append(value)
        samples["plain_copy"].append((before + bench.plain_copy()) / 2)
        for name, fn in (("plain_copy_threads", lambda: bench.plain_copy(threads=os.cpu_count() or 1)),
                         ("raw_write_buffered", lambda: bench.raw_write(direct=False)),
                         ("raw_write_direct", lambda: bench.raw_write(direct=True)),
                         ("restore", bench.restore),
                         ("raw_read_new_memory", lambda: bench.raw_read(into_new_memory=True)),
                         ("raw_read_preallocated", lambda: bench.raw_read(into_new_memory=False)),
                         ("torch_save", bench.torch_save)):
            samples[name].append(fn())
            settle()
    # The baseline write is the faster of the two raw writes, repetition by repetition.
    samples["raw_write"] = [min(a, b) for a, b in zip(samples["raw_write_buffered"], samples["raw_write_direct"])]
    throughput: list[tuple[float, float, int]] = []
    for i in range(args.throughput_reps or 2 * args.reps):
        throughput.append(bench.throughput(alone_first=i % 2 == 1, steps_alone=throughput[-1][2] if throughput else 1))
    ratios = {
        "stall_vs_plain_copy": median_ratio(list(zip(samples["stall"], samples["plain_copy"]))),
        "torch_save_vs_stall": median_ratio(list(zip(samples["torch_save"], samples["stall"]))),
        "commit_vs_raw_write": median_ratio(list(zip(samples["committed"], samples["raw_write"]))),
        "throughput_while_saving": median_ratio([(busy, idle) for busy, idle, _ in throughput]),
        "restore_vs_raw_read": median_ratio(list(zip(samples["restore"], samples["raw_read_new_memory"]))),
    }
    other = {
        "stall_vs_threaded_plain_copy": median_ratio(list(zip(samples["stall"], samples["plain_copy_threads"]))),
        "restore_vs_raw_read_preallocated": median_ratio(list(zip(samples["restore"],
                                                                  samples["raw_read_preallocated"]))),
        "commit_vs_raw_write_buffered": median_ratio(list(zip(samples["committed"], samples["raw_write_buffered"]))),
        "done_with_retention_vs_raw_write": median_ratio(list(zip(samples["done"], samples["raw_write"]))),
    }
    figures = {}
    for name, value in ratios.items():
        op, target = TARGETS[name]
        figures[name] = {"median": round(value, 3), "target": f"{op} {target}",
                         "met": value <= target if op == "<=" else value >= target}
    return {
        "benchmark": "bench_torch", "device": str(bench.device), "host": platform.node(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "state_bytes": bench.state_bytes, "state_gib": round(bench.state_bytes / 2**30, 3),
        "params": sum(p.numel() for p in bench.model.parameters()), "reps": args.reps,
        "figures": figures,
        "other_ratios": {k: round(v, 3) for k, v in other.items()},
        "seconds_median": {k: round(statistics.median(v), 4) for k, v in samples.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in samples.items()},
        "throughput_steps_per_s": [{"while_saving": round(b, 3), "alone": round(i, 3), "steps": n}
                                   for b, i, n in throughput],
        "write_gb_per_s": round(bench.state_bytes / statistics.median(samples["raw_write"]) / 1e9, 3),
        "read_gb_per_s": round(bench.state_bytes / statistics.median(samples["raw_read_preallocated"]) / 1e9, 3),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="a ~50 MB state instead of ~1 GiB")
    p.add_argument("--layers", type=int, default=None, help="Linear layers (default 22; 12 with --quick)")
    p.add_argument("--hidden", type=int, default=None, help="layer width (default 2048; 576 with --quick)")
    p.add_argument("--batch", type=int, default=32, help="rows per training step")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 3 with --quick)")
    p.add_argument("--throughput-reps", type=int, default=None, help="busy/alone pairs (default: 2 x reps)")
    p.add_argument("--tmp", default=None, help="folder to write in (default: the system's temp folder)")
    args = p.parse_args(argv)
    args.layers = args.layers or (12 if args.quick else 22)
    args.hidden = args.hidden or (576 if args.quick else 2048)
    args.reps = args.reps or (3 if args.quick else 5)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU here")
    return args


def main(argv: list[str] | None = None) -> int:
    for key in [k for k in os.environ if k.startswith("SAVEGAME_")]:
        del os.environ[key]  # a benchmark, never part of a supervised run
    print(json.dumps(run(parse_args(argv)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
