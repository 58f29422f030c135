"""Memory of the shared-memory hand-over, printed as JSON (run: .venv/bin/python bench/bench_handover_memory.py
[--quick] [--framework torch]).

The same worker (tests/workers/memory_worker.py: a state of --mb MiB in a few tensors, saved every
step, 3 saves and the final one) run on its own (the in-process writer) and under
`savegame run --shared-memory`. The worker reports its RSS before the state exists (the baseline),
its peak RSS (VmHWM) and the shared memory it maps (RssShmem, its segments); this script samples
the bytes in the run's /dev/shm folder while it runs. Every figure is a ratio to the state's size:
`peak_rss` (over the baseline: the live state counts 1), `private_peak` (the same without the
segments), `dev_shm_peak`, and `saving` (what saving holds besides the live state: private - 1 +
/dev/shm).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Daemon, clean_env  # noqa: E402
from savegame.snapshot.folder import folder_for  # noqa: E402

WORKER = str(ROOT / "tests" / "workers" / "memory_worker.py")


def shm_bytes(folder: str) -> int:
    total = 0
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        try:
            total += os.stat(os.path.join(folder, name)).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def figures(report: dict, shm_peak: int) -> dict:
    state = report["state"]
    private = (report["hwm"] - report["shmem"] - report["baseline"]) / state
    return {"peak_rss": round((report["hwm"] - report["baseline"]) / state, 2), "private_peak": round(private, 2),
            "dev_shm_peak": round(shm_peak / state, 2), "saving": round(private - 1 + shm_peak / state, 2)}


def run(folder: Path, framework: str, mb: float, supervised: bool) -> dict:
    args = [WORKER, "--framework", framework, "--mb", str(mb)]
    if not supervised:
        out = subprocess.run([sys.executable, *args, "--dir", str(folder / "alone")], check=True, env=clean_env(),
                             capture_output=True, text=True, timeout=600).stdout
        return figures(json.loads(out.splitlines()[-1]), 0)
    run_dir = folder / "supervised"
    daemon = Daemon(run_dir, args, ["--shared-memory"]).start()
    shm, peak, done = folder_for(str(run_dir)), [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], shm_bytes(shm))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert daemon.wait(600) == 0, daemon.stderr[-2000:]
    finally:
        done.set()
        sampler.join()
    assert "from shared memory" in daemon.stderr, "nothing was handed over"
    return figures(json.loads(daemon.stdout.splitlines()[-1]), peak[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 32 MiB state instead of 256 MiB")
    parser.add_argument("--framework", choices=["numpy", "torch"], default="numpy")
    args = parser.parse_args()
    mb = 32 if args.quick else 256
    with tempfile.TemporaryDirectory() as tmp:
        result = {"framework": args.framework, "state_mib": mb,
                  "in_process": run(Path(tmp), args.framework, mb, supervised=False),
                  "handover": run(Path(tmp), args.framework, mb, supervised=True)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
