"""NaN and loss-spike rollback with real processes: a script whose data holds a NaN (or a spike) at a
given batch. With `skip_batches` the run ends bit for bit where a run that leaves that batch out
ends; no checkpoint of the bad state is ever saved, the ones from the anomaly's step on are set aside
(quarantined, not deleted), and `max` is enforced (the daemon exits 76)."""
import json
import subprocess
from datetime import datetime
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import TESTS, Daemon, clean_env, committed_steps

pytestmark = pytest.mark.integration
LOSS_WORKER = str(TESTS / "workers" / "loss_worker.py")


def final_hash(output: str) -> str:
    return [line.split()[1] for line in output.splitlines() if line.startswith("final-weights-sha256")][-1]


def reference(tmp_path: Path, *args: str) -> str:
    """A standalone run in a folder of its own; its final weights' hash."""
    cwd = tmp_path / f"reference-{len(list(tmp_path.glob('reference-*')))}"
    cwd.mkdir()
    done = subprocess.run([sys.executable, LOSS_WORKER, *args], cwd=cwd, env=clean_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return final_hash(done.stdout)


def rollback_config(tmp_path: Path, **rollback) -> list[str]:
    config = tmp_path / "rollback.toml"
    body = ", ".join(f"{k} = {json.dumps(v)}" for k, v in rollback.items())
    config.write_text(f"rollback = {{{body}}}\n[keep]\nlast = 100\n")
    return ["--config", str(config)]


def weights_of(run: Path, step: int) -> np.ndarray:
    return next(iter(load_file(str(run / f"ckpt-{step:012d}" / "state.safetensors")).values()))


def quarantined_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:17]) for p in (run / ".quarantine").glob("ckpt-*")) if (run / ".quarantine").exists() else []


def test_a_nan_rolls_back_and_skipping_its_batch_ends_like_a_run_without_it(tmp_path):
    expected = reference(tmp_path, "--drop", "0:12", "--every", "1000")
    poisoned = reference(tmp_path, "--nan-at", "0:12", "--every", "1000")  # without rollback: ruined
    assert poisoned != expected
    run = tmp_path / "run"
    daemon = Daemon(run, [LOSS_WORKER, "--nan-at", "0:12", "--every", "1"],  # a save at every step
                    rollback_config(tmp_path, on=["nan"], skip_batches=True, max=3)).start()
    assert daemon.wait(timeout=120) == 0, daemon.stderr
    assert final_hash(daemon.stdout) == expected
    err = daemon.stderr
    assert "the loss went bad at step 12 (batch 12 of epoch 0): the loss is not finite (nan)" in err
    assert "rolling back to before step 12 (rollback 1 of 3)" in err
    assert "resuming from step 11" in err and "skipping batch 12 of epoch 0" in err
    assert quarantined_steps(run) == [12]  # saved before the bad loss showed, on the suspect state: set aside
    for step in committed_steps(run):  # nothing saved holds the poisoned state
        assert np.all(np.isfinite(weights_of(run, step))), step
    assert json.loads((run / ".savegame" / "status.json").read_text())["restarts"] == {"rollback": 1}


def test_without_skipping_a_nan_that_comes_back_gives_up_after_max_with_exit_76(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, [LOSS_WORKER, "--nan-at", "0:12", "--every", "4"],
                    rollback_config(tmp_path, on=["nan"], max=2)).start()
    assert daemon.wait(timeout=120) == 76, daemon.stderr
    err = daemon.stderr
    assert err.count("rolling back to before step 12") == 2
    assert "giving up: the loss went bad 3 times (rollback.max = 2)" in err
    record = json.loads((run / ".savegame" / "anomalies.json").read_text())["anomalies"]
    assert [(a["step"], a["epoch"], a["batch"], a["kind"], a["loss"]) for a in record] == [(12, 0, 12, "nan", None)] * 3
    assert max(committed_steps(run)) < 12 and quarantined_steps(run) == [12, 12, 12]  # each replay saved it again
    assert "final-weights-sha256" not in daemon.stdout


def test_a_spike_rolls_back_on_its_own_and_the_next_start_skips_it(tmp_path):
    """Without a daemon: the worker sets the suspect checkpoints aside, exits 76 and says to run again."""
    expected = reference(tmp_path, "--drop", "1:3", "--every", "1000")
    args = [LOSS_WORKER, "--spike-at", "1:3", "--every", "5", "--rollback", "nan,spike;skip"]
    first = subprocess.run([sys.executable, *args], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                           timeout=120)
    assert first.returncode == 76, first.stderr
    assert "the loss went bad at step 23 (batch 3 of epoch 1)" in first.stderr
    assert "more than 10 x the running median" in first.stderr and "run it again" in first.stderr
    run = tmp_path / "checkpoints"
    assert max(committed_steps(run)) == 20 and quarantined_steps(run) == []  # nothing saved from step 23 on
    second = subprocess.run([sys.executable, *args], cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stderr
    assert final_hash(second.stdout) == expected


def test_rollback_off_leaves_a_nan_alone(tmp_path):
    """Reporting losses changes nothing when [rollback] is off (the default)."""
    run = tmp_path / "run"
    daemon = Daemon(run, [LOSS_WORKER, "--nan-at", "0:12"]).start()
    assert daemon.wait(timeout=120) == 0, daemon.stderr
    assert "went bad" not in daemon.stderr and not (run / ".savegame" / "anomalies.json").exists()


def test_the_bucket_copy_of_a_suspect_step_is_set_aside_too(tmp_path, s3_server):
    """Step 12 is saved and mirrored before batch 12's NaN shows: the rollback quarantines it on both
    tiers, so neither this daemon nor a fresh machine resuming from the bucket starts from it."""
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    worker = [LOSS_WORKER, "--nan-at", "0:12", "--every", "4", "--pause-at", "0:12", "--pause", "3"]
    daemon = Daemon(run, worker, [*rollback_config(tmp_path, on=["nan"], skip_batches=True), "--mirror", url],
                    env=s3_server.env).start()
    assert daemon.wait(timeout=120) == 0, daemon.stderr
    listing = subprocess.run([sys.executable, "-m", "savegame.cli", "ls", url, "--json", "--all"], env=clean_env(
        s3_server.env), capture_output=True, text=True, timeout=60)
    rows = json.loads(listing.stdout)
    anomaly_time = json.loads((run / ".savegame" / "anomalies.json").read_text())["anomalies"][0]["time"]
    for row in rows:  # every listed step from 12 on was saved after the rollback (the new timeline)
        if row["status"] == "committed" and row["step"] >= 12:
            assert datetime.fromisoformat(row["created"].replace("Z", "+00:00")).timestamp() > anomaly_time - 1, row
    assert any(row["step"] == 12 and row["status"] == "quarantined" for row in rows), rows
    assert f"quarantined step 12 in {url}" in daemon.stderr and "resuming from step 8" in daemon.stderr


def test_the_scripts_own_rollback_setting_is_the_daemons_too(tmp_path):
    """Checkpointer(rollback={..., "max": 2}) with no [rollback] given to the daemon: the daemon gives up
    after 2 rollbacks as the script said, not after its own default of 3."""
    run = tmp_path / "run"
    daemon = Daemon(run, [LOSS_WORKER, "--nan-at", "0:6", "--every", "4", "--rollback", "nan"]).start()
    assert daemon.wait(timeout=120) == 76, daemon.stderr
    assert "rollback 2 of 2" in daemon.stderr and "giving up: the loss went bad 3 times (rollback.max = 2)" in daemon.stderr
