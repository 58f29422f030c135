"""Found by an adversarial review (each case failed before its fix) (issue 9 item 1, SECURITY.md "Events from the worker"; issue 8 D/E: a run
survives what happens to the session that started it).

The event socket lives in a folder under $XDG_RUNTIME_DIR when that is writable. That folder is not
the daemon's:
- systemd-logind removes /run/user/UID when the user's last session ends (the default
  KillUserProcesses=no keeps tmux/nohup processes running). The socket is gone: every worker finds
  "the daemon is gone", saves an emergency checkpoint and exits 75; the daemon restarts it with the
  same dead address, forever (preemptions are free of the budget).
- Under `sudo -E`, root's daemon puts its socket folder in the invoking user's runtime dir; that user
  can rename it away and the same endless stop/restart loop follows.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from helpers import Daemon, counter, wait_until

pytestmark = pytest.mark.integration
NOBODY = 65534


def _no_restart_loop(d: Daemon, seconds: float = 6.0) -> None:
    time.sleep(seconds)
    err = d.stderr
    assert "preempted" not in err and d.proc.poll() is None, err[-2000:]
    restarts = (d.status() or {}).get("restarts", {})
    assert not restarts, f"the worker was restarted: {restarts}"


def test_the_runtime_dir_removed_at_logout_does_not_start_a_stop_restart_loop(tmp_path):
    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    d = Daemon(tmp_path / "run", counter("--steps", 100000, "--every", 1000, "--sleep", 0.01),
               env={"XDG_RUNTIME_DIR": str(runtime)}).start()
    try:
        d.ready()
        shutil.rmtree(runtime)  # what logind does when the user's last session ends
        _no_restart_loop(d)
    finally:
        d.kill()


def test_the_owner_of_xdg_runtime_dir_cannot_stop_roots_run(tmp_path):
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv")
    runtime = tmp_path / "user-runtime"
    runtime.mkdir(mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    tmp_path.chmod(0o755)
    d = Daemon(tmp_path / "run", counter("--steps", 100000, "--every", 1000, "--sleep", 0.01),
               env={"XDG_RUNTIME_DIR": str(runtime)}).start()  # sudo -E keeps the user's XDG_RUNTIME_DIR
    try:
        d.ready()
        assert not list(runtime.glob("savegame-*")), "the daemon put its socket in a folder another user owns"
        _no_restart_loop(d)
    finally:
        d.kill()
