"""A 2-rank DDP job under `savegame run -- torchrun ...` (CPU, gloo): one rank SIGKILLed mid-epoch and
the daemon SIGTERMed mid-epoch, and still the same final weights as a run left alone."""
from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from dist_helpers import (DDP_EXAMPLE, JobDaemon, final_hash, kill_pid, manifests, progress_step, rank_files_complete,
                          torchrun)
from helpers import clean_env, savegame, wait_until

pytestmark = pytest.mark.frameworks

# 4,000 training images / (16 x 2 ranks) = 125 steps per epoch
SCRIPT = [DDP_EXAMPLE, "--epochs", "2", "--batch-size", "16", "--seed", "3", "--save-every-steps", "20"]


def _job(run: Path) -> JobDaemon:
    return JobDaemon(run, torchrun(2), SCRIPT, ["--grace", "60"]).start()


def test_interrupted_ddp_job_ends_with_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    alone = _job(tmp_path / "alone")
    assert alone.wait(timeout=600) == 0, alone.stderr[-3000:]
    expected = final_hash(alone.stdout)
    assert expected, alone.stdout[-2000:]

    run = tmp_path / "run"
    first = _job(run)
    ranks = first.ranks(2)
    assert [r["rank"] for r in ranks] == [0, 1]
    wait_until(lambda: progress_step(run) >= 30, timeout=300, interval=0.01)  # mid-epoch 0, after step 20's save
    kill_pid(ranks[1]["pid"])  # one rank dies: torchrun ends the job, the daemon restarts all of it
    wait_until(lambda: (first.status() or {}).get("restarts", {}).get("crash") == 1, timeout=120)
    first.ranks(2)
    wait_until(lambda: progress_step(run) >= 160, timeout=300, interval=0.01)  # mid-epoch 1
    first.signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0, first.stderr[-3000:]
    status = first.status() or {}
    assert status["state"] == "stopped" and "emergency checkpoint committed" in status["reason"], status
    emergency = manifests(run)[-1]
    assert emergency["reason"] == "emergency" and 125 < emergency["step"] < 250, emergency
    assert all(rank_files_complete(m) and m["world_size"] == 2 for m in manifests(run))

    second = _job(run)
    assert second.wait(timeout=600) == 0, second.stderr[-3000:]
    assert f"resumed from step {emergency['step']}" in second.stdout
    assert final_hash(second.stdout) == expected
    assert savegame("verify", str(run)).returncode == 0


def test_status_shows_the_world_size_and_each_rank(tmp_path: Path) -> None:
    run = tmp_path / "run"
    job = _job(run)
    ranks = job.ranks(2)
    assert {r["local_rank"] for r in ranks} == {0, 1}
    shown = savegame("status", str(run)).stdout
    assert "world size 2, 2 rank(s) on this node (incl. rank 0)" in shown, shown
    assert "local rank 1: rank 1" in shown, shown
    job.signal(signal.SIGTERM)
    assert job.wait(timeout=120) == 0


def test_torchrun_restarting_by_itself_is_refused(tmp_path: Path) -> None:
    launcher = [c if c != "0" else "3" for c in torchrun(2)]  # --max-restarts 3
    done = subprocess.run(JobDaemon(tmp_path / "run", launcher, SCRIPT).cmd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 78, done.stderr
    assert "--max-restarts 0" in done.stderr


def test_another_number_of_ranks_mid_epoch_is_refused_unless_the_epoch_restarts(tmp_path: Path) -> None:
    """Saved by 2 ranks 10 steps into an epoch, resumed with 1: where each rank stood in its share of
    the epoch cannot be carried over. The daemon stops with 78 (the rank's code, not torchrun's 1);
    SAVEGAME_RESHARD=restart-epoch trains that epoch again from its start."""
    run = tmp_path / "run"
    short = [DDP_EXAMPLE, "--epochs", "1", "--limit-batches", "15", "--save-every-steps", "10"]
    done = subprocess.run([*torchrun(2), *short, "--dir", str(run)], env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for folder in run.glob("ckpt-*"):
        if folder.name != "ckpt-000000000010":
            shutil.rmtree(folder)
    refused = JobDaemon(run, torchrun(1), short).start()
    assert refused.wait(timeout=300) == 78, refused.stderr[-3000:]
    assert "saved by 2 ranks 10 steps into epoch 0; this job has 1" in refused.stderr
    assert "worker reported a configuration error" in refused.stderr
    again = JobDaemon(run, torchrun(1), short, env={"SAVEGAME_RESHARD": "restart-epoch"}).start()
    assert again.wait(timeout=300) == 0, again.stderr[-3000:]
    assert "resumed from step 10 (epoch 0, batch 0) with 1 ranks" in again.stdout
