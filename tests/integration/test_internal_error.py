"""A bug in the daemon's own loop still gives the worker its emergency checkpoint, and a daemon
started from an environment that names a shared-memory folder never hands saves to it."""
import json
import os
import time
from pathlib import Path

import pytest

from helpers import TESTS, Daemon, committed_steps, counter, wait_until

pytestmark = pytest.mark.integration


def test_an_internal_error_in_event_handling_still_commits_the_emergency_checkpoint(tmp_path):
    trigger = tmp_path / "fault"
    path = os.pathsep.join(p for p in (str(TESTS / "faults"), os.environ.get("PYTHONPATH", "")) if p)
    daemon = Daemon(tmp_path / "run", counter("--steps", 100000, "--every", 1000, "--sleep", 0.02, "--size-mb", 200),
                    env={"SAVEGAME_TEST_FAULT": str(trigger), "PYTHONPATH": path}).start()
    daemon.ready()
    time.sleep(0.5)
    trigger.touch()  # the next event the worker sends breaks the daemon's loop
    daemon.wait(timeout=90)
    assert "internal error" in daemon.stderr, daemon.stderr[-3000:]
    steps = committed_steps(tmp_path / "run")
    assert steps, daemon.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / f"ckpt-{steps[-1]:012d}" / "manifest.json").read_text())
    assert manifest["reason"] == "emergency", manifest


def test_an_inherited_segment_folder_is_not_passed_to_the_worker(tmp_path):
    """SAVEGAME_SEGMENTS in the daemon's own environment (a leftover export, a run started from a
    worker of another run) is the daemon's to give, never passed through."""
    folder = tmp_path / "not-the-daemons"
    folder.mkdir(mode=0o700)
    daemon = Daemon(tmp_path / "run", counter("--steps", 20, "--every", 5),
                    env={"SAVEGAME_SEGMENTS": str(folder)}).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr[-3000:]
    assert committed_steps(tmp_path / "run") == [5, 10, 15, 20]
    assert list(folder.iterdir()) == []
