"""Found by an adversarial review (each case failed before its fix) (issue 9 item 6, SECURITY.md "The run folder"): who else can change the run folder.

- A run folder inside a folder another user owns passes check_run_folder (only the last component is
  checked). That user can swap it for a symlink while the daemon runs: the daemon (root here) then
  runs retention in whatever folder the link names, deleting another run's checkpoints.
- "A user-private group may write" is decided from gr_mem only; users whose *primary* gid is that
  group are not listed there. nobody (65534) shares its primary group nogroup with sync and _apt
  (as every user shares `users` on distributions without user-private groups).
"""
from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from helpers import Daemon, committed_steps, counter, savegame, wait_until
from savegame.errors import ConfigError
from savegame.storage.local import check_run_folder

pytestmark = pytest.mark.integration
NOBODY = 65534


@pytest.fixture
def shared_base():
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    base = Path(tempfile.mkdtemp(prefix="sg-review-", dir="/tmp"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, text=True)


def test_a_run_folder_inside_another_users_folder_is_refused(shared_base):
    evil = shared_base / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    result = savegame("run", "--dir", str(evil / "run"), "--", "true")
    assert result.returncode == 78, "accepted a run folder whose parent another user can rename: " + result.stderr[-500:]


def test_the_owner_of_the_parent_cannot_redirect_retention_into_another_folder(shared_base):
    victim = shared_base / "victim"  # root's other run: three checkpoints
    assert savegame("run", "--dir", str(victim), "--keep-last", "5", "--", sys.executable,
                    *counter("--steps", 30, "--every", 10, "--size-mb", 0.01)).returncode == 0
    assert committed_steps(victim) == [10, 20, 30]
    evil = shared_base / "evil"
    evil.mkdir()
    os.chown(evil, NOBODY, NOBODY)
    d = Daemon(evil / "run", counter("--steps", 100000, "--every", 50, "--sleep", 0.01, "--size-mb", 0.01),
               ["--keep-last", "1"]).start()
    try:
        wait_until(lambda: d.proc.poll() is not None or (d.status() or {}).get("worker_ready"), timeout=30)
        if d.proc.poll() is not None:  # refused at start: the fix
            assert d.proc.returncode == 78 and "parent" in d.stderr, d.stderr[-800:]
            assert committed_steps(victim) == [10, 20, 30]
            return
        swap = as_nobody("sh", "-c", f"mv {evil}/run {evil}/old && ln -s {victim} {evil}/run")
        if swap.returncode:  # the daemon refused the folder: that is the fix
            return
        time.sleep(3)
        d.signal(signal.SIGTERM)
        d.wait(timeout=60)
    finally:
        d.kill()
    assert {10, 20, 30} <= set(committed_steps(victim)), \
        "root's daemon deleted another run's checkpoints through a link planted by another user"


def test_a_group_writable_folder_is_private_only_if_no_other_user_has_that_primary_group(tmp_path, monkeypatch):
    try:
        sharing = [u.pw_name for u in pwd.getpwall() if u.pw_gid == NOBODY and u.pw_uid != NOBODY]
        grp.getgrgid(NOBODY)
    except KeyError:
        pytest.skip("no nogroup here")
    if not sharing or os.geteuid() != 0:
        pytest.skip("no other user with nogroup as primary group, or not root")
    run = tmp_path / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)
    run.chmod(0o770)
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    with pytest.raises(ConfigError):  # today: accepted, though `sharing` (e.g. sync, _apt) can write it
        check_run_folder(str(run))
