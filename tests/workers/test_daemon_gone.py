"""A worker whose daemon died (kill -9) learns it from its next event, saves an emergency
checkpoint and exits 75 on its own, instead of training on unsupervised."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import COUNTER_WORKER, committed_steps
from worker_helpers import EventSocket, stderr_lines, worker_env

pytestmark = pytest.mark.integration


def test_worker_saves_and_exits_75_when_its_daemon_is_gone(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "steps.log"
    events = EventSocket(tmp_path / "ev.sock")
    env = worker_env(SAVEGAME_DIR=str(run_dir), SAVEGAME_EVENTS=events.path, SAVEGAME_RESUME_FROM="")
    command = [sys.executable, COUNTER_WORKER, "--steps", "100000", "--sleep", "0.01", "--every", "1000000",
               "--log", str(log)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        events.wait_for("hello")
        events.wait_for("heartbeat")
        events.close()  # the daemon is gone: its socket is still there, nobody reads it
        closed = time.monotonic()
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 75, err
    assert time.monotonic() - closed < 5
    steps = [int(s) for s in log.read_text().split()]
    assert committed_steps(run_dir) == [len(steps)]
    manifest = json.loads((run_dir / f"ckpt-{len(steps):012d}" / "manifest.json").read_text())
    assert manifest["reason"] == "emergency"
    lines = stderr_lines(err)
    assert len(lines) == 1 and "the daemon is gone" in lines[0] and "emergency checkpoint" in lines[0], err
