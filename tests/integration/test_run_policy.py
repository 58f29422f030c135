"""The run's policy is stored with its checkpoints: the best survives daemon restarts, fresh VMs and
every command that reads retention, even when only the script knows the monitored metric."""
import json

import pytest

from helpers import Daemon, committed_steps, counter, savegame

pytestmark = pytest.mark.integration

# The README's quick-start pattern: the monitor is set in the script only (Checkpointer(monitor="loss")),
# `savegame run` gets no --monitor. The loss is lowest at epoch 2 (step 10).
WORKER = ("--every", 1000, "--epoch-steps", 5, "--metric", "--best-epoch", 2, "--sleep", 0.002)


def policy_of(run):
    return json.loads((run / ".savegame" / "policy.json").read_text())


def test_the_best_survives_a_daemon_restart(tmp_path):
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 40, *WORKER), ["--keep-last", "1"]).start()
    assert first.wait() == 0, first.stderr
    assert committed_steps(run) == [10, 40]
    assert policy_of(run)["monitor"] == "loss" and policy_of(run)["mode"] == "min"
    second = Daemon(run, counter("--steps", 60, *WORKER), ["--keep-last", "1"]).start()  # a reboot, say
    assert second.wait() == 0, second.stderr
    assert "deleted local steps [10" not in second.stderr
    assert committed_steps(run) == [10, 60]
    # Every reader of retention uses the stored policy: ls, prune, restore --best.
    plan = json.loads(savegame("prune", str(run), "--dry-run", "--json").stdout)
    assert "best loss" in {k["step"]: k["why"] for k in plan["keep"]}[10] and plan["delete"] == []
    rows = json.loads(savegame("ls", str(run), "--json").stdout)
    assert "best loss" in [r for r in rows if r["step"] == 10][0]["keep"]
    restored = savegame("restore", str(run), "--best", "--to", str(tmp_path / "best"))
    assert restored.returncode == 0, restored.stderr
    assert (tmp_path / "best" / "ckpt-000000000010" / "manifest.json").exists()


def test_no_retention_runs_while_the_policy_is_unknown(tmp_path):
    """An older run folder without a stored policy: nothing is deleted until the worker reports, though
    `--keep-last 1` alone would delete most of it (and does, once the policy is known)."""
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 40, *WORKER), ["--keep-last", "10"]).start()
    assert first.wait() == 0, first.stderr
    before = committed_steps(run)
    assert len(before) == 8  # one per epoch: what --keep-last 1 would mostly delete
    (run / ".savegame" / "policy.json").unlink()
    second = Daemon(run, ["-c", "import time; time.sleep(1.5)"], ["--keep-last", "1"]).start()  # never reports
    assert second.wait() == 0, second.stderr
    assert committed_steps(run) == before
    assert "no retention until the worker reports its settings" in second.stderr
    third = Daemon(run, counter("--steps", 40, *WORKER), ["--keep-last", "1"]).start()  # reports: retention runs
    assert third.wait() == 0, third.stderr
    assert len(committed_steps(run)) < len(before)


def test_resume_best_uses_the_stored_policy_and_needs_one(tmp_path):
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 40, *WORKER), ["--keep-last", "1"]).start()
    assert first.wait() == 0, first.stderr
    best = Daemon(run, counter("--steps", 45, *WORKER), ["--resume", "best", "--keep-last", "1"]).start()
    assert best.wait() == 0, best.stderr
    assert "resuming from step 10" in best.stderr
    (run / ".savegame" / "policy.json").unlink()
    unknown = Daemon(run, counter("--steps", 50, *WORKER), ["--resume", "best"]).start()
    assert unknown.wait() == 78
    assert "needs a monitored metric" in unknown.stderr and "Traceback" not in unknown.stderr


def test_the_bucket_keeps_its_best_across_restarts_and_serves_a_fresh_vm(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    mirror = ["--mirror", url, "--keep-last", "1"]
    first = Daemon(tmp_path / "vm1", counter("--steps", 40, *WORKER), mirror, env=s3_server.env).start()
    assert first.wait() == 0, first.stderr
    second = Daemon(tmp_path / "vm1", counter("--steps", 60, *WORKER), mirror, env=s3_server.env).start()
    assert second.wait() == 0, second.stderr
    assert "mirror retention: deleted step 10" not in second.stderr
    rows = json.loads(savegame("ls", url, "--json", env=s3_server.env).stdout)
    assert [r["step"] for r in rows] == [10, 60]
    assert "best loss" in rows[0]["keep"]
    # A replacement VM with an empty disk resumes from the bucket's best, knowing the monitor from the bucket.
    fresh = Daemon(tmp_path / "vm2", counter("--steps", 62, *WORKER), [*mirror, "--resume", "best"],
                   env=s3_server.env).start()
    assert fresh.wait() == 0, fresh.stderr
    assert "fetching step 10 from the mirror" in fresh.stderr
    assert policy_of(tmp_path / "vm2")["monitor"] == "loss"


def test_a_script_that_never_calls_restore_still_tells_the_daemon_its_policy(tmp_path):
    """A script that trains without ckpt.restore() (a mistake: it starts from scratch at every
    restart) must still report its settings when it starts training, or the daemon never learns the
    policy and never prunes: the disk fills. It is warned about the resume it skips."""
    script = tmp_path / "no_restore.py"
    script.write_text("import numpy as np, savegame\nw = np.zeros(1000, dtype=np.float32)\n"
                      "c = savegame.Checkpointer(every_steps=2, keep_last=2)\nc.track(w=w)\n"
                      "for _ in range(20):\n    w += 1\n    c.step()\nc.finish()\n")
    run = tmp_path / "run"
    first = Daemon(run, [str(script)]).start()
    assert first.wait() == 0, first.stderr
    assert committed_steps(run) == [18, 20]
    assert policy_of(run)["keep"]["last"] == 2
    second = Daemon(run, [str(script)]).start()  # the daemon resumes from step 20; the script ignores it
    assert second.wait() == 0, second.stderr
    assert "does not call restore()" in second.stderr
