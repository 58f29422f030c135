"""Helpers for tests of torch.distributed jobs under savegame: torchrun commands, the daemon of a job
(whose ranks live in sessions of their own, so killing the worker's group is not enough), and
what a job's status and checkpoints say."""
from __future__ import annotations

import json
import os
import re
import signal
import struct
import sys
from pathlib import Path
from typing import Optional, Sequence

import psutil

from helpers import Daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent
DDP_EXAMPLE = str(ROOT / "examples" / "pytorch_ddp_mnist.py")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
HASH = re.compile(r"final-weights-sha256 ([0-9a-f]{64})")


def torchrun(nproc: int = 2, *, nnodes: int = 1, node_rank: int = 0, endpoint: Optional[str] = None) -> list[str]:
    """torchrun's command line: standalone on one node, or one node of a c10d rendezvous."""
    cmd = [TORCHRUN, "--nproc-per-node", str(nproc), "--max-restarts", "0", "--monitor-interval", "0.1"]
    if nnodes == 1 and endpoint is None:
        return [*cmd, "--standalone"]
    return [*cmd, "--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", str(endpoint), "--rdzv-id", "savegame-test"]


class JobDaemon(Daemon):
    """`savegame run [options] -- torchrun ... script args` whose kill() also kills every rank."""

    def __init__(self, run_dir: Path, launcher: Sequence[str], script: Sequence[str], options: Sequence[str] = (),
                 env: Optional[dict] = None, status_name: str = "status.json") -> None:
        super().__init__(run_dir, [], options, env)
        self.cmd = self.cmd[:self.cmd.index("--") + 1] + [*launcher, *script]
        self.status_name = status_name

    def status(self) -> Optional[dict]:
        try:
            return json.loads((self.run_dir / ".savegame" / self.status_name).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def ranks(self, count: int, timeout: float = 120) -> list[dict]:
        """This node's ranks, once `count` of them announced themselves (sorted by local rank)."""
        def announced() -> Optional[list]:
            job = (self.status() or {}).get("job") or {}
            ranks = job.get("ranks") or []
            return ranks if len(ranks) >= count and (self.status() or {}).get("state") == "running" else None
        return list(wait_until(announced, timeout))  # type: ignore[arg-type]

    def kill(self) -> None:
        if self.proc is None:
            return
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        super().kill()
        for proc in tree:  # by pid: the ranks and whatever they started
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


def progress_step(run_dir: Path, name: str = "progress") -> int:
    """The step the job's ranks last reached (the shared progress cell), -1 before any."""
    try:
        raw = (run_dir / ".savegame" / name).read_bytes()[:8]
    except FileNotFoundError:
        return -1
    return struct.unpack("<q", raw)[0] if len(raw) == 8 else -1


def final_hash(text: str) -> Optional[str]:
    found = HASH.findall(text)
    return found[-1] if found else None


def manifests(run_dir: Path) -> list[dict]:
    return [json.loads((p / "manifest.json").read_text()) for p in sorted(Path(run_dir).glob("ckpt-*"))
            if (p / "manifest.json").exists()]


def rank_files_complete(manifest: dict) -> bool:
    """Every rank of the world size wrote its two files, and nothing else is per-rank."""
    world = manifest.get("world_size")
    ranked = {f["path"] for f in manifest["files"] if f["path"].startswith("rank-")}
    expected = {f"rank-{r}/{n}" for r in range(world or 0) for n in ("state.json", "tensors.safetensors")}
    return bool(world) and ranked == expected


def kill_pid(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
