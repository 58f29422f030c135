"""Found by an adversarial review (each case failed before its fix) (issue 8 items 1, 2 and C: "a resume never silently goes back in time").

1. `--resume best` over newer checkpoints starts a second timeline in the same folder. The next start
   with the default `latest` resumes from the abandoned timeline's newest checkpoint, skipping the
   emergency checkpoint the best-resumed run just committed (its work is silently thrown away).
2. The run's stored policy is the lowest settings layer (policy.py), but the daemon rebuilds its
   settings from the worker's report and the command line only: a stored `--keep-last 2` is
   overwritten with the regime default (10) on the next start, locally and in the bucket.
"""
from __future__ import annotations

import json
import re
import signal
import sys

import pytest

from helpers import Daemon, committed_steps, counter, savegame, wait_until

pytestmark = pytest.mark.integration
def ready(d: Daemon) -> None:
    """Daemon.ready() accepts a status.json left by the previous daemon of the folder: wait for this one's."""
    wait_until(lambda: (d.status() or {}).get("daemon_pid") == d.proc.pid and d.status().get("worker_ready"),
               timeout=30)


WORKER = ("--every", 10, "--epoch-steps", 10, "--metric", "--best-epoch", 2, "--size-mb", 0.01)


def test_the_next_start_after_resume_best_continues_the_new_timeline(tmp_path):
    run = tmp_path / "run"
    first = savegame("run", "--dir", str(run), "--keep-last", "10", "--", sys.executable,
                     *counter("--steps", 60, *WORKER))
    assert first.returncode == 0, first.stderr
    assert 20 in committed_steps(run) and 60 in committed_steps(run)

    again = Daemon(run, counter("--steps", 100000, "--sleep", 0.05, *WORKER), ["--resume", "best"]).start()
    ready(again)
    assert "resuming from step 20" in again.stderr
    wait_until(lambda: (again.status() or {}).get("heartbeat", {}).get("step", 0) >= 25, timeout=30)
    again.signal(signal.SIGTERM)
    assert again.wait(timeout=60) == 0, again.stderr
    emergency = [c for c in json.loads(savegame("ls", str(run), "--json").stdout) if c["reason"] == "emergency"]
    assert emergency, "no emergency checkpoint"
    saved = emergency[-1]["step"]
    assert saved < 60

    third = Daemon(run, counter("--steps", 100000, "--sleep", 0.05, *WORKER)).start()
    ready(third)
    third.signal(signal.SIGTERM)
    third.wait(timeout=60)
    resumed = re.findall(r"resuming from step (\d+)", third.stderr)[-1]  # the log file is shared: the last one
    assert int(resumed) == saved, (
        f"the run's own latest work is step {saved} (emergency, after --resume best); the next start resumed "
        f"from step {resumed} of the abandoned timeline")


def test_a_stored_keep_last_survives_a_start_without_the_flag(tmp_path):
    run = tmp_path / "run"
    first = savegame("run", "--dir", str(run), "--keep-last", "2", "--", sys.executable,
                     *counter("--steps", 40, *WORKER))
    assert first.returncode == 0, first.stderr
    assert json.loads((run / ".savegame" / "policy.json").read_text())["keep"]["last"] == 2
    second = savegame("run", "--dir", str(run), "--", sys.executable, *counter("--steps", 120, *WORKER))
    assert second.returncode == 0, second.stderr
    stored = json.loads((run / ".savegame" / "policy.json").read_text())
    assert stored["keep"]["last"] == 2, f"the stored policy was overwritten: {stored['keep']}"


def test_a_fresh_vm_resumed_from_best_gets_its_own_checkpoints_into_the_bucket(tmp_path, s3_server):
    """VM1 ran to step 60. VM2 (empty disk, same bucket, --resume best) resumes from step 20 and trains
    to 60 again. The bucket already has *a* checkpoint at 30..60 (VM1's), so awaiting_upload() counts
    them as held: VM2's never go up, nothing is logged, the flush says "the mirror holds every
    checkpoint it should" and the daemon exits 0. The next VM resumes VM1's step 60."""
    url = f"s3://{s3_server.make_bucket()}/run"
    vm1 = Daemon(tmp_path / "vm1", counter("--steps", 60, *WORKER), ["--mirror", url], env=s3_server.env).start()
    assert vm1.wait() == 0, vm1.stderr
    vm2 = Daemon(tmp_path / "vm2", counter("--steps", 60, *WORKER), ["--mirror", url, "--resume", "best"],
                 env=s3_server.env).start()
    code = vm2.wait()
    assert "resuming from step 20" in vm2.stderr
    local = {c["step"]: c["created"] for c in json.loads(savegame("ls", str(tmp_path / "vm2"), "--json").stdout)}
    bucket = {c["step"]: c["created"]
              for c in json.loads(savegame("ls", url, "--json", env=s3_server.env).stdout)}
    assert bucket.get(60) == local[60] or code != 0, (
        "exit 0 and 'the mirror holds every checkpoint it should', but the bucket's step 60 is VM1's, "
        f"not this run's final checkpoint (bucket {bucket.get(60)}, local {local[60]})")
