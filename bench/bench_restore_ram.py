"""Restart after a SIGKILL: the checkpoint read from RAM (the copy the daemon keeps in shared memory)
against the same checkpoint read from disk, printed as JSON (run: .venv/bin/python bench/bench_restore_ram.py
[--quick] [--size-mb N]).

One NumPy worker (a state of --size-mb, 1 GiB by default) under `savegame run`, twice in one run:
with --shared-memory (saves handed over; after the kill the daemon keeps the newest committed
segment and the next worker loads from it) and without (the next worker reads the checkpoint from
disk; it was written with O_DIRECT, so it is not in the page cache, as after a real crash). Each
attempt saves once, waits for the commit and SIGKILLs itself; the next attempts measure the time
`restore()` takes (every byte checked against the manifest either way) and the time from the
process's start to its first step after resuming. Medians over the restarts.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Daemon  # noqa: E402

WORKER = """
import json, os, signal, sys, time

def since_start():
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return float(open("/proc/uptime").read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")

import numpy as np
import savegame
size_mb, restarts, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
weights = np.zeros(int(size_mb * 2**20 / 4), dtype=np.float32)
ckpt = savegame.Checkpointer(every_steps=10**9, keep_last=2)
ckpt.track(weights=weights)
t0 = time.perf_counter()
info = ckpt.restore()
restore_s = time.perf_counter() - t0
ckpt.start_training()
weights += 1
ckpt.step()
if info is not None:
    assert float(weights[0]) == info.step + 1, (float(weights[0]), info.step)  # the right bytes were loaded
    with open(out, "a") as f:
        f.write(json.dumps({"restore_s": restore_s, "start_to_first_step_s": since_start()}) + "\\n")
if ckpt.progress.step <= restarts:
    ckpt.save("manual")
    ckpt.flush()
    os.kill(os.getpid(), signal.SIGKILL)
ckpt.finish()
"""


def run(folder: Path, size_mb: float, restarts: int, shared: bool) -> dict:
    name = "ram" if shared else "disk"
    script, out, config = folder / "worker.py", folder / f"{name}.jsonl", folder / "fast.toml"
    script.write_text(WORKER)
    config.write_text("backoff_initial = 0.1\nbackoff_max = 0.2\n")
    options = ["--config", str(config), "--max-restarts", str(restarts + 5)] + (["--shared-memory"] if shared else [])
    daemon = Daemon(folder / f"run-{name}", [str(script), str(size_mb), str(restarts), str(out)], options).start()
    assert daemon.wait(900) == 0, daemon.stderr[-3000:]
    if shared:
        loaded = daemon.stderr.count("from the copy kept in shared memory")
        assert loaded == restarts, f"only {loaded} of {restarts} restarts read from RAM:\n{daemon.stderr[-3000:]}"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return {key: round(statistics.median(row[key] for row in rows), 4) for key in rows[0]} | {"restarts": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size-mb", type=float, default=None)
    args = parser.parse_args()
    size_mb = args.size_mb or (64 if args.quick else 1024)
    restarts = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as tmp:
        disk = run(Path(tmp), size_mb, restarts, shared=False)
        ram = run(Path(tmp), size_mb, restarts, shared=True)
    print(json.dumps({"state_mb": size_mb, "from_disk": disk, "from_ram": ram,
                      "restore_disk_vs_ram": round(disk["restore_s"] / ram["restore_s"], 2),
                      "start_to_first_step_disk_vs_ram": round(disk["start_to_first_step_s"]
                                                               / ram["start_to_first_step_s"], 2),
                      "machine": f"{os.cpu_count()} cores",
                      "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))


if __name__ == "__main__":
    main()
