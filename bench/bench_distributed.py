"""Figures of torch.distributed jobs under savegame (2 ranks, CPU, gloo), measured side by side, as JSON.

    python bench/bench_distributed.py            # FSDP2 state of ~256 MiB (params + Adam), 2 ranks
    python bench/bench_distributed.py --quick    # ~32 MiB
    python bench/bench_distributed.py --device cuda   # NCCL training, pinned copies (written, not run here)

  agreement_cost_per_step     the stop/save agreement (one async all_reduce(MAX) on its own gloo group,
                              launched at one boundary, waited for at the next) per step, as a fraction
                              of the step, for steps of several lengths (compute + the training's own
                              gradient all_reduce, which keeps the ranks in step as DDP does);
                              `boundary_cost_per_step` is the whole Checkpointer.step(); `agreement_call_us`
                              the training thread's own time in the agreement's calls
  stall_vs_plain_copy         per rank: time the training thread is blocked in save() / a plain copy of
                              the rank's own shards into preallocated host memory (the slower rank)
  commit_vs_raw_write         save() until every rank sees the commit / every rank writing its shard's
                              bytes to its own file with fsync, at the same time (the slower rank)
  restart_to_first_step_s     `savegame run -- torchrun` with the example DDP job: SIGKILL of a rank ->
                              the restarted job's first step; next to the cold start -> first step
Each rank runs this file as `--rank-worker MODE` under torchrun; the parent collects their JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGETS = {"agreement_cost_per_step": ("<=", 0.01), "stall_vs_plain_copy": ("<=", 1.25),
           "commit_vs_raw_write": ("<=", 1.25)}


# -- inside a rank ---------------------------------------------------------------------------------

def _busy(ms: float, x: Any) -> None:
    """About `ms` of compute (matmuls), the same every time."""
    import torch
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        torch.mm(x, x)


def agree_worker(args: argparse.Namespace, out: dict) -> None:
    """Steps of compute plus the training's own gradient all_reduce (as DDP does, which keeps the
    ranks in step), with and without the agreement at each boundary."""
    import torch
    import torch.distributed as dist
    from savegame import Checkpointer
    ckpt = Checkpointer(os.path.join(args.root, "agree"), every_epochs=0, handle_signals=False)
    ckpt.track(model=torch.nn.Linear(4, 4))
    agreement = ckpt._agreement
    x, grads = torch.randn(64, 64), torch.randn(1 << 16)
    steps = 50 if args.quick else 200
    for ms in (1.0, 10.0, 50.0):
        rows: dict[str, list[float]] = {"plain": [], "agreement": [], "boundary": []}
        calls: list[float] = []
        for _ in range(3):
            for name in rows:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(steps):
                    _busy(ms, x)
                    dist.all_reduce(grads)  # the training's collective (DDP's gradient bucket)
                    if name == "boundary":
                        ckpt.step()
                    elif name == "agreement":
                        began = time.perf_counter()
                        agreement.decide(_moment(ckpt), ckpt._history, False, False)
                        agreement.launch(saved=False)
                        calls.append(time.perf_counter() - began)
                rows[name].append((time.perf_counter() - start) / steps)
                agreement.drain()
        plain = statistics.median(rows["plain"])
        out[f"{ms:g}ms"] = {"step_s": plain, "agreement_s": statistics.median(rows["agreement"]) - plain,
                            "boundary_s": statistics.median(rows["boundary"]) - plain,
                            "call_s": statistics.median(calls)}
    ckpt.close()


def _moment(ckpt: Any) -> Any:
    from savegame.strategies import Moment
    return Moment(ckpt.progress.step, ckpt.progress.epoch, time.monotonic(), False, {})


def save_worker(args: argparse.Namespace, out: dict) -> None:
    import numpy
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from savegame import Checkpointer

    hidden, layers = (1024, 2) if args.quick else (2048, 5)  # x3 (Adam) x4 bytes: ~24 / ~240 MiB
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(hidden, hidden) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(8, hidden)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(os.path.join(args.root, "save"), keep_last=1, keep_best=0, every_epochs=0, handle_signals=False)
    ckpt.track(model=model, optimizer=optimizer)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in _tensors(model, optimizer)]
    nbytes = sum(t.numel() * t.element_size() for t in local)
    host = numpy.empty(nbytes, dtype=numpy.uint8)
    host[:] = 1  # preallocated and touched, like savegame's reused buffer after the first save
    ratios: dict[str, list[float]] = {"stall": [], "copy": [], "commit": [], "raw": []}
    ckpt.save(wait=True)  # the first save allocates the host buffer
    for _ in range(2 if args.quick else 4):
        ckpt.progress.step += 1
        dist.barrier()
        start = time.perf_counter()
        offset = 0
        for t in local:
            view = t.detach().reshape(-1).view(torch.uint8).numpy()
            numpy.copyto(host[offset:offset + view.nbytes], view)
            offset += view.nbytes
        ratios["copy"].append(time.perf_counter() - start)
        dist.barrier()
        start = time.perf_counter()
        ckpt.save()
        ratios["stall"].append(time.perf_counter() - start)
        ckpt._writer.wait()
        ratios["commit"].append(_slowest(time.perf_counter() - start))
        dist.barrier()
        ratios["raw"].append(_slowest(_raw_write(host, os.path.join(args.root, f"raw-{dist.get_rank()}"))))
    ckpt.close()
    out.update(rank_bytes=nbytes, **{k: statistics.median(v) for k, v in ratios.items()},
               stall_vs_plain_copy=statistics.median(s / c for s, c in zip(ratios["stall"], ratios["copy"])),
               commit_vs_raw_write=statistics.median(c / r for c, r in zip(ratios["commit"], ratios["raw"])))


def _tensors(model: Any, optimizer: Any) -> list[Any]:
    out = list(model.state_dict().values())
    for state in optimizer.state.values():
        out += [v for v in state.values() if hasattr(v, "numel")]
    return out


def _slowest(seconds: float) -> float:
    import torch
    import torch.distributed as dist
    value = torch.tensor([seconds])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _raw_write(data: Any, path: str) -> float:
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[:64 << 20]):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def rank_worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    out: dict[str, Any] = {}
    (agree_worker if args.rank_worker == "agree" else save_worker)(args, out)
    dist.barrier()
    with open(os.path.join(args.root, f"{args.rank_worker}-{dist.get_rank()}.json"), "w") as f:
        json.dump(out, f)
    dist.destroy_process_group()


# -- the parent --------------------------------------------------------------------------------------

def _torchrun(mode: str, root: str, quick: bool) -> list[dict]:
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "--max-restarts", "0", __file__,
           "--rank-worker", mode, "--root", root] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True, capture_output=True, timeout=3600)
    return [json.loads(Path(root, f"{mode}-{r}.json").read_text()) for r in (0, 1)]


def _progress(run: Path) -> int:
    try:
        return struct.unpack("<q", (run / ".savegame" / "progress").read_bytes()[:8])[0]
    except (FileNotFoundError, struct.error):
        return -1


def _wait(predicate: Any, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError("benchmark step did not happen")
        time.sleep(0.005)


def restart_figures(root: str) -> dict[str, float]:
    """Cold start and restart after a rank's SIGKILL, to the first step, of the 2-rank DDP example."""
    run = Path(root, "restart")
    cmd = [str(BIN / "savegame"), "run", "--dir", str(run), "--", str(BIN / "torchrun"), "--standalone",
           "--nproc-per-node", "2", "--max-restarts", "0", str(ROOT / "examples" / "pytorch_ddp_mnist.py"),
           "--epochs", "3", "--batch-size", "16", "--save-every-steps", "20"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    start = time.monotonic()
    daemon = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _progress(run) >= 1)
        cold = time.monotonic() - start
        _wait(lambda: _progress(run) >= 25)
        status = json.loads((run / ".savegame" / "status.json").read_text())
        victim = status["job"]["ranks"][-1]["pid"]
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: _progress(run) < 0)  # the new job's progress cell
        _wait(lambda: _progress(run) >= 0)
        restart = time.monotonic() - killed
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
    return {"cold_start_to_first_step_s": cold, "restart_to_first_step_s": restart, "restart_vs_cold_start": restart / cold}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rank-worker", choices=("agree", "save"))
    p.add_argument("--root")
    p.add_argument("--only", choices=("save",), help="only the per-rank stall and commit figures")
    args = p.parse_args()
    if args.rank_worker:
        rank_worker(args)
        return
    if args.device != "cpu":
        sys.exit("bench_distributed.py: only --device cpu is implemented and run here (no GPU was available)")
    root = tempfile.mkdtemp(prefix="sg-bench-dist-")
    try:
        save = _torchrun("save", root, args.quick)
        if args.only == "save":
            print(json.dumps({"stall_vs_plain_copy": [r["stall_vs_plain_copy"] for r in save],
                              "commit_vs_raw_write": [r["commit_vs_raw_write"] for r in save], "ranks": save}, indent=1))
            return
        agree = _torchrun("agree", root, args.quick)
        restart = restart_figures(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    per_step = {k: {"step_ms": round(v["step_s"] * 1000, 3), "agreement_us": round(v["agreement_s"] * 1e6, 1),
                    "agreement_call_us": round(max(a[k]["call_s"] for a in agree) * 1e6, 1),
                    "agreement_fraction": max(a[k]["agreement_s"] for a in agree) / v["step_s"],
                    "boundary_fraction": max(a[k]["boundary_s"] for a in agree) / v["step_s"]}
                for k, v in agree[0].items()}
    ratios = {"agreement_cost_per_step": {k: round(v["agreement_fraction"], 4) for k, v in per_step.items()},
              "boundary_cost_per_step": {k: round(v["boundary_fraction"], 4) for k, v in per_step.items()},
              "stall_vs_plain_copy": round(max(r["stall_vs_plain_copy"] for r in save), 3),
              "commit_vs_raw_write": round(max(r["commit_vs_raw_write"] for r in save), 3),
              **{k: round(v, 3) for k, v in restart.items()}}
    print(json.dumps({"bench": "distributed", "machine": platform.node(), "cpus": os.cpu_count(),
                      "ranks": 2, "rank_bytes": [r["rank_bytes"] for r in save], "per_step": per_step,
                      "stall_s": [round(r["stall"], 4) for r in save], "copy_s": [round(r["copy"], 4) for r in save],
                      "commit_s": round(save[0]["commit"], 4), "raw_write_s": round(save[0]["raw"], 4),
                      "ratios": ratios, "targets": TARGETS}, indent=1))


if __name__ == "__main__":
    main()
