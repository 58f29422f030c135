"""Shared-memory hand-over figures, printed as JSON (run: .venv/bin/python bench/bench_handover.py [--quick]).

The same NumPy training worker runs on its own (saves written by its in-process BackgroundWriter)
and under `savegame run --shared-memory` (saves rendered into /dev/shm and committed by the daemon);
the two alternate, `--rounds` times each (alone, supervised, alone, supervised, ...), so that drift
on a shared machine hits both alike (the ratios are taken within a worker: both of its windows see
the same machine). Its state is one large float32 array (`--state-mb`, 512 MiB by
default) plus a `--width` x `--width` layer; a training step multiplies a `--width`-square batch by
the layer `--matmuls` times (BLAS, on every core: about 40 ms on the 2-core development VM),
updates the layer and one 4 MiB slice of the large array, and calls ckpt.step(). Each worker
measures, in this order:

  stall_s, commit_s    per save, the time its training thread spent in save() (the stall) and the
                       time from the save to its commit (`flush()` afterwards, so saves do not
                       overlap); medians over the saves, the first of each worker left out (it
                       allocates the buffers and segments)
  throughput           windows idle, busy, idle, repeated `--pairs` times: `busy` = the steps that
                       start between save() returning and the commit (the checkpoint's manifest in
                       the run folder, looked for after every step, as bench_torch.py does), as
                       steps/s; `idle` = as many steps (at least 5) with nothing in flight, just
                       before and just after; a pair's ratio is busy / the mean of its two idle
                       windows. Before each window the worker flushes, syncs and sleeps 0.3 s
                       (untimed). Each window also records the daemon's CPU seconds (/proc) and the
                       worker's own CPU time per step (its writer thread included).

The JSON reports, as medians of per-pair ratios over every pair of every worker of that kind:

  throughput_in_process     (b) steps/s while the worker's own writer persists / (a) without saving
  throughput_handed_over    (c) steps/s while the daemon persists the save / (a) without saving
  idle_supervised_vs_alone  (a) under the daemon / (a) alone, across workers (not within one): a check
                            on how steady the machine stayed from worker to worker

with `busy_steps` (how many steps ran while persisting, every window), `pair_ratios`, the CPU
figures, and the stall and commit medians of both kinds. A supervised worker that did not get the
hand-over (no HandoverWriter, or no "from shared memory" commit in the daemon's log) fails the
bench. `--quick` (64 MiB, one worker of each kind) is a smoke run: its busy windows hold 1-4 steps.
Restore from RAM is not built yet, so restart-to-first-step is not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Daemon, clean_env  # noqa: E402

WORKER = """
import json, os, sys, time
import numpy as np
import savegame
cfg = json.loads(sys.argv[1])
run_dir, n = cfg["run_dir"], cfg["width"]
rng = np.random.default_rng(0)
weights = np.ones(max(int(cfg["state_mb"] * 2**20 / 4) - n * n, 2**20), dtype=np.float32)
layer = rng.standard_normal((n, n), dtype=np.float32) / np.float32(np.sqrt(n))
batch = rng.standard_normal((n, n), dtype=np.float32)
chunk = 2**20  # 4 MiB of the large array changes every step
ckpt = savegame.Checkpointer(None if cfg["supervised"] else run_dir, every_steps=10**9, keep_last=1)
ckpt.track(weights=weights, layer=layer)
ckpt.start_training()
writer = type(ckpt._writer).__name__  # private: HandoverWriter under --shared-memory, else BackgroundWriter

def train_step():
    h = batch
    for _ in range(cfg["matmuls"]):
        h = h @ layer
    layer[:] -= np.float32(1e-9) * h
    start = (ckpt.progress.step * chunk) % (len(weights) - chunk)
    weights[start:start + chunk] += 1
    ckpt.step()

def settle():
    ckpt.flush()
    os.sync()
    time.sleep(0.3)

def cpu_s(pid):  # CPU seconds (user + system, every thread) of a process: here, the daemon
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0

daemon_pid = os.getppid() if cfg["supervised"] else None  # the daemon starts the worker itself

def window(steps=None, manifest=None):
    # over `steps` steps, or until `manifest` exists: (steps/s, steps, daemon CPU s, this process's CPU s)
    t0, cpu0, own0, done = time.perf_counter(), cpu_s(daemon_pid) if daemon_pid else 0.0, time.process_time(), 0
    while (done < steps) if manifest is None else (done == 0 or not os.path.exists(manifest)):
        train_step()
        done += 1
        if manifest is not None and time.perf_counter() - t0 > 300:
            raise SystemExit(f"{manifest} did not appear within 300 s")
    elapsed = time.perf_counter() - t0
    return (done / elapsed, done, cpu_s(daemon_pid) - cpu0 if daemon_pid else 0.0,
            time.process_time() - own0)

def idle(steps):
    settle()
    return window(steps=steps)

def busy():
    settle()
    train_step()  # a new step to save
    manifest = os.path.join(run_dir, f"ckpt-{ckpt.progress.step:012d}", "manifest.json")
    ckpt.save("manual")
    return window(manifest=manifest)  # until committed, by whichever process writes it

stalls, commits = [], []
for _ in range(cfg["saves"]):
    train_step()
    t0 = time.perf_counter()
    ckpt.save("manual")
    t1 = time.perf_counter()
    ckpt.flush()
    stalls.append(t1 - t0)
    commits.append(time.perf_counter() - t0)
pairs, last = [], 5
for _ in range(cfg["pairs"]):  # idle, busy, idle: the busy window against the mean of the two around it
    before = idle(last)
    during = busy()
    after = idle(max(during[1], 5))
    last = max(during[1], 5)
    pairs.append({"busy": during[0], "idle": (before[0] + after[0]) / 2, "busy_steps": during[1],
                  "idle_before_after": [before[0], after[0]],
                  "daemon_cpu_s": [before[2], during[2], after[2]],
                  "worker_cpu_per_step_s": [before[3] / before[1], during[3] / during[1], after[3] / after[1]]})
ckpt.finish()
open(cfg["out"], "w").write(json.dumps({"writer": writer, "stall_s": stalls, "commit_s": commits, "pairs": pairs}))
"""


def run(folder: Path, args: argparse.Namespace, supervised: bool, index: int) -> dict[str, Any]:
    name = f"{'supervised' if supervised else 'alone'}-{index}"
    script, out, run_dir = folder / "worker.py", folder / f"{name}.json", folder / f"run-{name}"
    script.write_text(WORKER)
    cfg = {"run_dir": str(run_dir), "supervised": supervised, "out": str(out), "state_mb": args.state_mb,
           "width": args.width, "matmuls": args.matmuls, "saves": args.saves, "pairs": args.pairs}
    worker = [str(script), json.dumps(cfg)]
    needed = (args.saves + args.pairs + 2) * args.state_mb * 2**20  # every save of the run, kept
    free = shutil.disk_usage(folder).free
    if free < 2 * needed:
        raise SystemExit(f"{folder}: {free / 2**30:.1f} GiB free, {2 * needed / 2**30:.1f} GiB wanted")
    handed = 0
    if supervised:
        # Under the daemon every save of the run stayed on disk (keep_last=1, and --keep-last 1,
        # did not prune them during these short runs): the run folder goes once the worker is done.
        daemon = Daemon(run_dir, worker, ["--shared-memory", "--keep-last", "1"]).start()
        assert daemon.wait(900) == 0, daemon.stderr[-2000:]
        handed = (daemon.stdout + daemon.stderr).count("from shared memory")
    else:
        subprocess.run([sys.executable, *worker], check=True, env=clean_env(), timeout=900)
    figures = json.loads(out.read_text())
    figures["checkpoints_left"] = len(list(run_dir.glob("ckpt-*")))
    shutil.rmtree(run_dir)
    expected = "HandoverWriter" if supervised else "BackgroundWriter"
    assert figures["writer"] == expected, f"{name}: the worker saved with {figures['writer']}, not {expected}"
    assert not supervised or handed > 0, f"{name}: the daemon committed nothing from shared memory"
    figures["handed_over_commits"] = handed
    return figures


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    pairs = [p for r in runs for p in r["pairs"]]
    return {
        "stall_s": round(statistics.median(s for r in runs for s in r["stall_s"][1:] or r["stall_s"]), 4),
        "commit_s": round(statistics.median(c for r in runs for c in r["commit_s"][1:] or r["commit_s"]), 4),
        "throughput_while_persisting": round(statistics.median(p["busy"] / p["idle"] for p in pairs), 3),
        "idle_steps_per_s": round(statistics.median(p["idle"] for p in pairs), 2),
        "busy_steps_per_s": round(statistics.median(p["busy"] for p in pairs), 2),
        "busy_steps": [p["busy_steps"] for p in pairs],
        "busy_window_s": round(statistics.median(p["busy_steps"] / p["busy"] for p in pairs), 3),
        "daemon_cpu_s_idle_busy_idle": [round(statistics.median(p["daemon_cpu_s"][i] for p in pairs), 3)
                                        for i in range(3)],
        "worker_cpu_ms_per_step_idle_busy_idle": [
            round(1000 * statistics.median(p["worker_cpu_per_step_s"][i] for p in pairs), 1) for i in range(3)],
        "pair_ratios": [round(p["busy"] / p["idle"], 3) for p in pairs],
        "handed_over_commits": sum(r["handed_over_commits"] for r in runs),
        "checkpoints_left_per_worker": [r["checkpoints_left"] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, one worker of each kind, 3 pairs (< 1 min)")
    parser.add_argument("--state-mb", type=float, default=None, help="state size in MiB (default 512; 64 quick)")
    parser.add_argument("--width", type=int, default=1024, help="the layer's and the batch's side")
    parser.add_argument("--matmuls", type=int, default=4, help="matrix products per training step")
    parser.add_argument("--rounds", type=int, default=None, help="workers of each kind, alternating (default 2)")
    parser.add_argument("--saves", type=int, default=None, help="saves per worker for stall/commit (default 5)")
    parser.add_argument("--pairs", type=int, default=None, help="busy/idle pairs per worker (default 8)")
    parser.add_argument("--tmp", default=None, help="folder to write in (default: the system's temp folder)")
    args = parser.parse_args()
    quick = {"state_mb": 64, "rounds": 1, "saves": 3, "pairs": 3}
    full = {"state_mb": 512, "rounds": 2, "saves": 5, "pairs": 8}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    load_before = [round(x, 2) for x in os.getloadavg()]
    alone: list[dict[str, Any]] = []
    handed: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="savegame-bench-", dir=args.tmp) as tmp:
        for i in range(args.rounds):
            alone.append(run(Path(tmp), args, supervised=False, index=i))
            handed.append(run(Path(tmp), args, supervised=True, index=i))
    a, c = summary(alone), summary(handed)
    print(json.dumps({
        "state_mb": args.state_mb, "step_ms": round(1000 / a["idle_steps_per_s"], 1),
        "matmuls_per_step": f"{args.matmuls} x {args.width}^2 float32",
        "workers_per_kind": args.rounds, "saves_per_worker": args.saves, "pairs_per_worker": args.pairs,
        "throughput_in_process": a["throughput_while_persisting"],
        "throughput_handed_over": c["throughput_while_persisting"],
        "idle_supervised_vs_alone": round(c["idle_steps_per_s"] / a["idle_steps_per_s"], 3),
        "stall_handed_over_vs_in_process": round(c["stall_s"] / a["stall_s"], 3),
        "commit_handed_over_vs_in_process": round(c["commit_s"] / a["commit_s"], 3),
        "in_process": a, "handed_over": c,
        "machine": f"{os.cpu_count()} cores", "load_avg_before_after": [load_before, [round(x, 2) for x in os.getloadavg()]],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1))


if __name__ == "__main__":
    main()
