"""Daemon figures, printed as JSON (run: .venv/bin/python bench/bench_daemon.py [--quick]).

- stop request -> emergency checkpoint committed, for a 256 MiB state, next to its target:
  one step + a raw durable write of the same bytes (measured here, in the same run) + 0.5 s;
- worker death (SIGKILL) -> replacement worker started, without backoff (target <= 1 s);
- the daemon's idle CPU share and resident memory while a worker runs (targets < 1 %, < 60 MB).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from helpers import Daemon, committed_steps, counter, wait_until  # noqa: E402


def raw_durable_write(folder: Path, nbytes: int) -> float:
    data = memoryview(bytearray(os.urandom(1 << 20)) * (nbytes >> 20))
    path = folder / "raw.bin"
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        f.write(data)
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def emergency_stop(folder: Path, size_mb: int, step_s: float) -> dict:
    run = folder / f"stop-{time.monotonic_ns()}"
    daemon = Daemon(run, counter("--steps", 10**9, "--sleep", step_s, "--size-mb", size_mb, "--every", 10**9),
                    ["--grace", "60"]).start()
    daemon.worker_pid()
    wait_until(lambda: (daemon.status() or {}).get("heartbeat", {}).get("step", 0) >= 3, timeout=60)
    start = time.perf_counter()
    daemon.signal(signal.SIGTERM)
    wait_until(lambda: committed_steps(run), timeout=60, interval=0.002)
    committed = time.perf_counter() - start
    assert daemon.wait(timeout=60) == 0
    exited = time.perf_counter() - start
    return {"stop_to_committed_s": committed, "stop_to_exit_s": exited}


def restart_latency(folder: Path, kills: int) -> list[float]:
    run = folder / "restart"
    config = folder / "fast.toml"
    config.write_text("max_restarts = 1000\nbackoff_initial = 0\nbackoff_max = 0\n")  # no backoff
    daemon = Daemon(run, counter("--steps", 10**9, "--sleep", 0.01, "--size-mb", 16, "--every", 20),
                    ["--config", str(config)]).start()
    latencies = []
    try:
        pid = daemon.worker_pid()
        wait_until(lambda: committed_steps(run), timeout=30)
        for _ in range(kills):
            time.sleep(0.3)
            start = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            pid = daemon.worker_pid(timeout=30, other_than=pid)
            latencies.append(time.perf_counter() - start)
            wait_until(lambda: (daemon.status() or {}).get("heartbeat"), timeout=30)
    finally:
        daemon.signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    return latencies


def idle_footprint(folder: Path, seconds: float) -> dict:
    daemon = Daemon(folder / "idle", ["-c", "import time; time.sleep(3600)"]).start()
    try:
        daemon.worker_pid()
        time.sleep(1.0)  # past start-up
        ticks = os.sysconf("SC_CLK_TCK")

        def cpu_seconds() -> float:
            fields = Path(f"/proc/{daemon.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks

        before, start = cpu_seconds(), time.perf_counter()
        time.sleep(seconds)
        cpu = (cpu_seconds() - before) / (time.perf_counter() - start)
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS"))
        modules = subprocess.run([sys.executable, "-c", "import sys, savegame.cli, savegame.daemon.supervisor; "
                                  "print([m for m in ('torch','tensorflow','keras','numpy') if m in sys.modules])"],
                                 capture_output=True, text=True).stdout.strip()
    finally:
        daemon.signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    return {"idle_cpu_percent": round(cpu * 100, 3), "rss_mb": round(rss_kb / 1024, 1),
            "framework_modules_loaded": modules, "target_cpu_percent": 1.0, "target_rss_mb": 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    size_mb, reps, step_s = (64, 2, 0.05) if args.quick else (256, 5, 0.05)
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        stops, raws = [], []
        for _ in range(reps):  # alternate, so both see the same machine
            raws.append(raw_durable_write(folder, size_mb << 20))
            stops.append(emergency_stop(folder, size_mb, step_s))
        committed = statistics.median(s["stop_to_committed_s"] for s in stops)
        raw = statistics.median(raws)
        target = step_s + raw + 0.5
        restarts = restart_latency(folder, 3 if args.quick else 8)
        footprint = idle_footprint(folder, 5 if args.quick else 20)
    print(json.dumps({
        "emergency_checkpoint": {
            "state_mb": size_mb, "step_s": step_s, "repetitions": reps,
            "stop_to_committed_median_s": round(committed, 3),
            "stop_to_daemon_exit_median_s": round(statistics.median(s["stop_to_exit_s"] for s in stops), 3),
            "raw_durable_write_median_s": round(raw, 3), "target_s": round(target, 3),
            "ratio_to_target": round(committed / target, 3)},
        "restart": {"kills": len(restarts), "death_to_replacement_median_s": round(statistics.median(restarts), 3),
                    "max_s": round(max(restarts), 3), "target_s": 1.0},
        "daemon_idle": footprint,
    }, indent=1))


if __name__ == "__main__":
    main()
