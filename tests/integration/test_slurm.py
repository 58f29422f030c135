"""SLURM: `#SBATCH --signal=B:USR1@120 --requeue` and `exec savegame run ...` in the batch script.

A real daemon gets the real signal; a fake `scontrol` first on PATH records its arguments and which
checkpoints were committed when it ran (the requeue must come after the emergency checkpoint)."""
import json
import os
import signal
import stat

import pytest

from helpers import Daemon, committed_steps, counter, wait_until

pytestmark = pytest.mark.integration
WORKER = counter("--steps", 100000, "--sleep", 0.01, "--every", 10**6)


@pytest.fixture
def scontrol(tmp_path):
    """A fake scontrol: appends {"args": [...], "committed": [...]} to calls.jsonl; exits $FAKE_SCONTROL_EXIT."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f"""#!/usr/bin/env python3
import json, os, sys
run = os.environ.get("FAKE_RUN_DIR", "")
steps = sorted(int(n[5:]) for n in os.listdir(run) if n.startswith("ckpt-")
               and os.path.exists(os.path.join(run, n, "manifest.json"))) if run else []
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "committed": steps}}) + "\\n")
if os.environ.get("FAKE_SCONTROL_EXIT", "0") != "0":
    print("scontrol: error: Job is not requeueable", file=sys.stderr)
sys.exit(int(os.environ.get("FAKE_SCONTROL_EXIT", "0")))
""")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)

    def calls_made():
        return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return str(bin_dir), calls_made


def slurm_daemon(tmp_path, bin_dir, signal_name="SIGUSR1", job="4242", exit_code=0):
    run = tmp_path / "run"
    config = tmp_path / "slurm.toml"
    config.write_text(f'preemption_signal = "{signal_name}"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_RUN_DIR": str(run), "FAKE_SCONTROL_EXIT": str(exit_code)}
    if job:
        env["SLURM_JOB_ID"] = job
    return run, Daemon(run, WORKER, ["--config", str(config)], env=env).start()


def reason_of(run, step):
    return json.loads((run / f"ckpt-{step:012d}" / "manifest.json").read_text())["reason"]


def test_the_preemption_signal_saves_then_requeues_the_job(tmp_path, scontrol):
    bin_dir, calls = scontrol
    run, daemon = slurm_daemon(tmp_path, bin_dir)
    daemon.ready()
    daemon.signal(signal.SIGUSR1)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    emergency = committed_steps(run)[-1]
    assert reason_of(run, emergency) == "emergency"
    assert calls() == [{"args": ["requeue", "4242"], "committed": [emergency]}]  # after the commit, once
    assert "SIGUSR1 (the preemption signal): asking the worker for an emergency checkpoint" in daemon.stderr
    assert "requeued SLURM job 4242" in daemon.stderr


def test_a_job_that_cannot_be_requeued_exits_75_and_says_so(tmp_path, scontrol):
    bin_dir, calls = scontrol
    run, daemon = slurm_daemon(tmp_path, bin_dir, exit_code=1)
    daemon.ready()
    daemon.signal(signal.SIGUSR1)
    assert daemon.wait(timeout=30) == 75, daemon.stderr
    assert reason_of(run, committed_steps(run)[-1]) == "emergency"
    assert "Job is not requeueable" in daemon.stderr and "#SBATCH --requeue" in daemon.stderr


def test_outside_slurm_the_signal_only_stops(tmp_path, scontrol):
    bin_dir, calls = scontrol
    run, daemon = slurm_daemon(tmp_path, bin_dir, job="")
    daemon.ready()
    daemon.signal(signal.SIGUSR1)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert calls() == [] and "SLURM_JOB_ID is not set" in daemon.stderr


def test_with_usr2_as_the_signal_usr1_still_means_checkpoint_now(tmp_path, scontrol):
    bin_dir, calls = scontrol
    run, daemon = slurm_daemon(tmp_path, bin_dir, signal_name="USR2")
    daemon.ready()
    daemon.signal(signal.SIGUSR1)
    wait_until(lambda: committed_steps(run), timeout=20)
    assert reason_of(run, committed_steps(run)[0]) == "manual" and daemon.proc.poll() is None and calls() == []
    daemon.signal(signal.SIGUSR2)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert reason_of(run, committed_steps(run)[-1]) == "emergency"
    assert [c["args"] for c in calls()] == [["requeue", "4242"]]


def test_a_plain_sigterm_never_requeues(tmp_path, scontrol):
    """scancel: the person wants the job gone."""
    bin_dir, calls = scontrol
    run, daemon = slurm_daemon(tmp_path, bin_dir)
    daemon.ready()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert calls() == [] and reason_of(run, committed_steps(run)[-1]) == "emergency"
