"""SIGKILL random ranks of a 2-rank DDP job at random moments (mid-step, mid-save, mid-commit): every
committed checkpoint holds both ranks' parts of one step and verifies, and the job, restarted each
time from the latest one, ends with the weights of a run left alone (no step lost, repeated or
mixed across ranks)."""
from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest

from dist_helpers import (DDP_EXAMPLE, JobDaemon, final_hash, kill_pid, manifests, progress_step, rank_files_complete,
                          torchrun)
from helpers import clean_env, savegame, wait_until

pytestmark = [pytest.mark.frameworks, pytest.mark.chaos]

# 1,920 images / (16 x 2 ranks) = 60 steps per epoch, a save every 3 steps: kills often land inside one.
SCRIPT = [DDP_EXAMPLE, "--epochs", "2", "--batch-size", "16", "--limit-batches", "60", "--save-every-steps", "3"]


def _kill_at_random(daemon: JobDaemon, run: Path, rng: random.Random) -> str:
    """Kill one rank, once the job trains: at a random moment, or as a save is being staged."""
    ranks = daemon.ranks(2)
    wait_until(lambda: progress_step(run) >= 0, timeout=120, interval=0.01)
    victim = rng.choice(ranks)
    if rng.random() < 0.5:
        time.sleep(rng.uniform(0.0, 1.0))
        moment = "mid-step"
    else:
        staging = run / ".staging"
        wait_until(lambda: staging.exists() and any(staging.iterdir()), timeout=60, interval=0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        moment = "mid-save"
    kill_pid(victim["pid"])
    return f"rank {victim['rank']} {moment} at step {progress_step(run)}"


@pytest.mark.parametrize("seed", range(2))
def test_random_sigkills_of_ranks_never_tear_or_mix_a_checkpoint(tmp_path: Path, seed: int) -> None:
    alone = subprocess.run([*torchrun(2), *SCRIPT, "--dir", str(tmp_path / "alone")], env=clean_env(),
                           capture_output=True, text=True, timeout=600)
    assert alone.returncode == 0, alone.stderr[-3000:]
    rng = random.Random(seed)
    run = tmp_path / "run"
    config = tmp_path / "savegame.toml"
    config.write_text("backoff_initial = 0.05\nbackoff_max = 0.2\n")
    daemon = JobDaemon(run, torchrun(2), SCRIPT, ["--config", str(config), "--max-restarts", "20",
                                                  "--keep-last", "1000"]).start()
    kills = []
    for _ in range(3):
        try:
            kills.append(_kill_at_random(daemon, run, rng))
        except TimeoutError:
            break  # the job finished first
        wait_until(lambda: (daemon.status() or {}).get("restarts", {}).get("crash", 0) >= len(kills)
                   or daemon.proc.poll() is not None, timeout=120)
    assert daemon.wait(timeout=900) == 0, daemon.stderr[-3000:]
    assert len(kills) >= 2, kills
    assert final_hash(daemon.stdout) == final_hash(alone.stdout), kills
    for manifest in manifests(run):
        assert manifest["world_size"] == 2 and rank_files_complete(manifest), manifest
        folder = run / f"ckpt-{manifest['step']:012d}"
        for rank in (0, 1):  # each rank's part is of the manifest's step: never two steps in one checkpoint
            own = json.loads((folder / f"rank-{rank}" / "state.json").read_text())
            assert own["rank"] == rank and own["progress"]["step"] == manifest["step"], (manifest["step"], rank)
    done = savegame("verify", str(run))
    assert done.returncode == 0, done.stdout
