"""Found by an adversarial review (each case failed before its fix) (issue 9 items 6, 9, 13; SECURITY.md "Files"): odd files where savegame keeps its
own state in `.savegame/`. SECURITY.md: a symlink or a FIFO is refused, not followed or read forever;
issue 9: tracebacks become messages. Each case used to give a traceback (exit 1) or, for a
FIFO at worker.out, a daemon that blocks in open() forever before it even logs a line.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import SAVEGAME, clean_env

pytestmark = pytest.mark.integration


def _plant(dot, kind: str) -> None:
    name, what = kind.split(":")
    path = dot / name
    if what == "link":
        os.symlink("/etc/hostname", path)
    elif what == "dir":
        path.mkdir()
    elif what == "fifo":
        os.mkfifo(path)


@pytest.mark.parametrize("kind", ["worker.out:fifo", "worker.out:link", "worker.err:dir", "progress:dir",
                                  "run_id:dir", "settings.json:dir"])
def test_an_odd_file_in_dot_savegame_is_a_message_not_a_traceback_or_a_hang(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir(mode=0o750)
    (run / ".savegame").mkdir()
    _plant(run / ".savegame", kind)
    try:
        proc = subprocess.run([SAVEGAME, "run", "--dir", str(run), "--", sys.executable, "-c", "pass"],
                              capture_output=True, text=True, env=clean_env(), timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"savegame run blocked for 20 s on {kind} (nothing logged)")
    assert "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert proc.returncode == 78, proc.stderr[-1500:]
    assert kind.split(":")[0] in proc.stderr
