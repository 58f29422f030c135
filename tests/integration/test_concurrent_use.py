"""Found by an adversarial review (each case failed before its fix): commands and writers running at the same time as a run (issue 8 D, brief:
"prune/ls/restore/verify while a daemon runs").

- A script run on its own applies retention from its writer thread; anything else deleting in the
  same folder (`savegame prune`, a daemon) makes that retention raise, and the training script dies
  with a FileNotFoundError traceback (exit 1).
- A script run on its own takes no lock: `savegame run` on its folder starts a second writer.
- `savegame verify` while a daemon's retention deletes reports the deleted checkpoints as DAMAGED
  ("no manifest.json", "unreadable ... No such file") and exits 1: a false alarm for monitoring.
"""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from helpers import COUNTER_WORKER, Daemon, clean_env, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def test_a_prune_next_to_a_script_run_on_its_own_does_not_kill_the_training(tmp_path):
    proc = subprocess.Popen([sys.executable, COUNTER_WORKER, "--steps", "100000", "--every", "2", "--sleep", "0.002",
                             "--size-mb", "1"], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (tmp_path / "checkpoints").exists() and list((tmp_path / "checkpoints").glob("ckpt-*")))
        deadline = time.monotonic() + 40
        while proc.poll() is None and time.monotonic() < deadline:
            savegame("prune", str(tmp_path / "checkpoints"), "--keep-last", "1")
        assert proc.poll() is None, "the training script died: " + proc.communicate()[1][-1500:]
    finally:
        proc.kill()
        proc.communicate()


def test_savegame_run_refuses_a_folder_a_script_run_on_its_own_is_writing(tmp_path):
    solo = subprocess.Popen([sys.executable, COUNTER_WORKER, "--steps", "100000", "--every", "20", "--sleep", "0.01",
                             "--size-mb", "0.01"], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: list((tmp_path / "checkpoints").glob("ckpt-*")))
        result = savegame("run", "--dir", str(tmp_path / "checkpoints"), "--", sys.executable,
                          *counter("--steps", 300, "--every", 20, "--sleep", 0.01, "--size-mb", 0.01), timeout=120)
        assert result.returncode == 78, "a second writer ran on the folder: " + result.stderr[-800:]
    finally:
        solo.kill()
        solo.wait()


def test_verify_while_a_daemon_prunes_reports_no_false_damage(tmp_path):
    run = tmp_path / "run"
    d = Daemon(run, counter("--steps", 100000, "--every", 5, "--sleep", 0.002, "--size-mb", 2),
               ["--keep-last", "1"]).start()
    try:
        d.ready()
        wait_until(lambda: len(list(run.glob("ckpt-*"))) >= 1)
        for _ in range(40):
            result = savegame("verify", str(run))
            assert result.returncode == 0, result.stdout[-800:]
    finally:
        d.kill()
