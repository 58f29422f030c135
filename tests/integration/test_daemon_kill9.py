"""Found by an adversarial review (it failed before its fix) (issue 8 item 12, README "One writer per run folder": "a new daemon waits for
[the orphan's emergency checkpoint], then resumes"). The lock's holder record names the dead daemon;
process_alive() is kill(pid, 0), which succeeds on a zombie. Until the killed daemon's parent reaps it
(a supervisor script that has not called wait() yet, an init that reaps late), the new daemon says
"another `savegame run` ... already supervises" and exits 78, the code systemd never retries."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import SAVEGAME, clean_env, counter, wait_until

pytestmark = pytest.mark.integration


def test_a_new_daemon_after_kill_9_is_not_refused_while_the_old_one_is_a_zombie(tmp_path):
    run = tmp_path / "run"
    cmd = [SAVEGAME, "run", "--dir", str(run), "--", sys.executable,
           *counter("--steps", 100000, "--every", 100000, "--sleep", 0.01, "--size-mb", 300)]
    old = subprocess.Popen(cmd, env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    new = None
    try:
        wait_until(lambda: (run / ".savegame" / "status.json").exists() and
                   '"worker_ready": true' in (run / ".savegame" / "status.json").read_text(), timeout=30)
        os.kill(old.pid, signal.SIGKILL)
        wait_until(lambda: open(f"/proc/{old.pid}/stat").read().split()[2] == "Z", timeout=10)  # not reaped yet
        new = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        new = None  # still waiting for the orphan: what the README promises
    finally:
        old.wait()
        try:  # a worker the new daemon may have started before the timeout killed it
            import json
            os.killpg(json.loads((run / ".savegame" / "status.json").read_text())["worker_pid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    assert new is None or new.returncode != 78, new.stderr[-500:]
