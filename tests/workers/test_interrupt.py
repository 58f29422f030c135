"""Ctrl-C on a script run on its own: the first saves an emergency checkpoint at the next step
boundary and exits 75 with one line saying so; a second quits at once (KeyboardInterrupt)."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import COUNTER_WORKER, committed_steps, wait_until
from worker_helpers import default_signals, stderr_lines, worker_env

pytestmark = pytest.mark.integration

ACK = "savegame: interrupted: saving a checkpoint at the next step; press Ctrl-C again to quit at once"


def counter(tmp_path: Path, *args: object) -> subprocess.Popen:
    """The counter worker on its own (no daemon), saving into ./checkpoints, as from a terminal."""
    return subprocess.Popen([sys.executable, COUNTER_WORKER, "--log", str(tmp_path / "steps.log"), *map(str, args)],
                            cwd=tmp_path, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=default_signals)


def logged(tmp_path: Path) -> list[int]:
    path = tmp_path / "steps.log"
    return [int(s) for s in path.read_text().split()] if path.exists() else []


def test_first_ctrl_c_saves_and_exits_75_then_the_run_resumes(tmp_path: Path) -> None:
    proc = counter(tmp_path, "--steps", 100000, "--sleep", 0.01, "--every", 10**6)
    wait_until(lambda: len(logged(tmp_path)) >= 5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 75, err
    step = len(logged(tmp_path))
    assert committed_steps(tmp_path / "checkpoints") == [step]
    assert stderr_lines(err) == [ACK, f"savegame: interrupted: saved step {step} (emergency); run again to resume"]
    again = counter(tmp_path, "--steps", step + 5)
    out, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert f"DONE {step + 5}" in out
    assert logged(tmp_path) == list(range(step + 5)), "the resumed run repeated or skipped a step"


def test_second_ctrl_c_quits_at_once(tmp_path: Path) -> None:
    proc = counter(tmp_path, "--steps", 100, "--sleep", 5, "--every", 10**6)  # a step takes 5 s
    wait_until(lambda: logged(tmp_path) == [0])  # inside the first step
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 4, "the second Ctrl-C waited for the step to end"
    assert proc.returncode in (-signal.SIGINT, 130), err
    assert err.splitlines()[0] == ACK and "KeyboardInterrupt" in err
    assert committed_steps(tmp_path / "checkpoints") == []
