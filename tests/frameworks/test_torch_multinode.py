"""Two nodes on one machine: one daemon per node on a shared run folder (and a bucket mirror), each
running `torchrun --nnodes 2 --rdzv-backend c10d` with one rank. A SIGTERM to one daemon stops the
whole job at one step with one emergency checkpoint holding every rank's part; both daemons say
truthfully what happened; the job resumes from it and ends with the weights of a run left alone."""
from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from conftest import free_port
from dist_helpers import (DDP_EXAMPLE, JobDaemon, final_hash, manifests, progress_step, rank_files_complete,
                          torchrun)
from helpers import clean_env, savegame, wait_until

pytestmark = pytest.mark.frameworks

# torchrun sets OMP_NUM_THREADS=1 only for several ranks per node; CPU kernels sum in another order with
# another number of threads, so the comparison fixes it everywhere.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SCRIPT = [DDP_EXAMPLE, "--epochs", "2", "--batch-size", "16", "--seed", "5", "--save-every-steps", "50"]


def _node(run: Path, name: str, rank: int, endpoint: str, rdzv: str, mirror: str, env: dict) -> JobDaemon:
    launcher = [*torchrun(1, nnodes=2, node_rank=rank, endpoint=endpoint)]
    launcher[launcher.index("savegame-test")] = rdzv
    options = ["--nodes", "2", "--node", name, "--grace", "60", "--mirror", mirror]
    daemon = JobDaemon(run, launcher, SCRIPT, options, env=env, status_name=f"status.{name}.json")
    daemon.out, daemon.err = run.parent / f"{name}.out", run.parent / f"{name}.err"
    return daemon.start()


def test_a_stop_on_one_node_saves_every_ranks_part_and_the_job_resumes(tmp_path: Path, s3_server) -> None:
    alone = subprocess.run([*torchrun(2), *SCRIPT, "--dir", str(tmp_path / "alone")], env=clean_env(ONE_THREAD),
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    expected = final_hash(alone.stdout)

    run, env = tmp_path / "shared", {**s3_server.env, **ONE_THREAD}
    mirror = f"s3://{s3_server.make_bucket()}/run"
    endpoint, rdzv = f"127.0.0.1:{free_port()}", uuid.uuid4().hex[:8]
    a = _node(run, "a", 0, endpoint, rdzv, mirror, env)
    b = _node(run, "b", 1, endpoint, rdzv, mirror, env)
    a.ranks(1), b.ranks(1)
    wait_until(lambda: progress_step(run, "progress.a") >= 140, timeout=300, interval=0.01)  # mid-epoch 1
    a.signal(signal.SIGTERM)
    assert a.wait(timeout=180) == 0, a.stderr[-3000:]
    assert "after the stop request: emergency checkpoint committed" in a.stderr, a.stderr[-3000:]
    emergency = manifests(run)[-1]
    assert emergency["reason"] == "emergency" and 125 < emergency["step"] < 250
    assert emergency["world_size"] == 2 and rank_files_complete(emergency)
    wait_until(lambda: "another node asked for an emergency checkpoint" in b.stderr, timeout=60)
    assert "preempted: not counted against the budget" in b.stderr
    assert b.proc.poll() is None  # b restarted its torchrun: it waits for the other node

    a = _node(run, "a", 0, endpoint, rdzv, mirror, env)
    assert a.wait(timeout=600) == 0, a.stderr[-3000:]
    assert b.wait(timeout=120) == 0, b.stderr[-3000:]
    assert f"resumed from step {emergency['step']}" in a.stdout + b.stdout
    assert final_hash(a.stdout + b.stdout) == expected
    assert savegame("verify", str(run)).returncode == 0
    remote = savegame("verify", mirror, env=env)
    assert remote.returncode == 0 and f"step {manifests(run)[-1]['step']}: ok" in remote.stdout, remote.stdout
    shown = savegame("status", str(run)).stdout
    assert "node a:" in shown and "node b:" in shown and "(leader: retention and mirror)" in shown, shown
