"""Shared-memory hand-over figures, printed as JSON (run: .venv/bin/python bench/bench_handover.py [--quick]).

The same NumPy training worker, saving every few steps, run twice: on its own (the in-process
writer) and under `savegame run` (saves handed over to the daemon in /dev/shm). Per save, the
worker measures the time its training thread spent in save() (the stall) and the time from the
save to its commit (`flush()` afterwards, so saves do not overlap). Medians over the saves.
Restore from RAM is not built yet, so restart-to-first-step is not measured here.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Daemon, clean_env  # noqa: E402

WORKER = """
import json, sys, time
import numpy as np
import savegame
size_mb, saves, out = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
weights = np.ones(int(size_mb * 2**20 / 4), dtype=np.float32)
ckpt = savegame.Checkpointer(sys.argv[4] if len(sys.argv) > 4 else None, every_steps=10**9, keep_last=2)
ckpt.track(weights=weights)
ckpt.start_training()
stalls, commits = [], []
for _ in range(saves):
    weights += 1
    ckpt.step()
    t0 = time.perf_counter()
    ckpt.save("manual")
    t1 = time.perf_counter()
    ckpt.flush()
    stalls.append(t1 - t0)
    commits.append(time.perf_counter() - t0)
ckpt.finish()
open(out, "w").write(json.dumps({"stall_s": stalls, "commit_s": commits}))
"""


def run(folder: Path, size_mb: float, saves: int, supervised: bool) -> dict:
    script, out = folder / "worker.py", folder / ("supervised.json" if supervised else "alone.json")
    script.write_text(WORKER)
    args = [str(script), str(size_mb), str(saves), str(out)]
    if supervised:
        daemon = Daemon(folder / "run-supervised", args).start()
        assert daemon.wait(600) == 0, daemon.stderr[-2000:]
    else:
        subprocess.run([sys.executable, *args, str(folder / "run-alone")], check=True, env=clean_env(), timeout=600)
    figures = json.loads(out.read_text())
    return {k: round(statistics.median(v[1:] or v), 4) for k, v in figures.items()}  # the first warms buffers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size_mb, saves = (32, 4) if args.quick else (256, 6)
    with tempfile.TemporaryDirectory() as tmp:
        alone = run(Path(tmp), size_mb, saves, supervised=False)
        handed = run(Path(tmp), size_mb, saves, supervised=True)
    print(json.dumps({"state_mb": size_mb, "saves": saves, "in_process": alone, "handed_over": handed,
                      "stall_handed_over_vs_in_process": round(handed["stall_s"] / alone["stall_s"], 3),
                      "commit_handed_over_vs_in_process": round(handed["commit_s"] / alone["commit_s"], 3),
                      "machine": f"{os.cpu_count()} cores", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                     indent=2))


if __name__ == "__main__":
    main()
