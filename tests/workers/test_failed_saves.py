"""A checkpoint that must exist and was not committed ends the worker with exit 74 (EX_IOERR) and
one line saying why: the final one, the emergency one, and saves that keep failing.

The disk is "full" for real: RLIMIT_FSIZE in the worker process makes write() fail with EFBIG
once a file reaches the limit (SIGXFSZ ignored), as a full disk makes it fail with ENOSPC.
"""
from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import COUNTER_WORKER, committed_steps, wait_until
from worker_helpers import stderr_lines, worker_env

pytestmark = pytest.mark.integration

LIMIT = 1 << 20  # the worker's state is 2 MiB: no checkpoint fits


def small_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def counter(tmp_path: Path, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, COUNTER_WORKER, "--size-mb", "2", *map(str, args)], cwd=tmp_path,
                            env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=small_disk)


def test_a_failed_final_save_exits_74(tmp_path: Path) -> None:
    proc = counter(tmp_path, "--steps", 3, "--every", 10**6)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 74, err
    assert "DONE" not in out
    lines = stderr_lines(err)  # the epoch end's periodic save failed first, in the background
    assert [line.split(":")[0] for line in lines[:-1]] == ["checkpoint at step 3 not saved"]
    assert lines[-1] == f"savegame: the final checkpoint (step 3) was not saved: {_reason(err)}"
    assert "no space left" in err and "Traceback" not in err
    assert committed_steps(tmp_path / "checkpoints") == []


def test_a_failed_emergency_save_exits_74(tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    proc = counter(tmp_path, "--steps", 100000, "--sleep", 0.01, "--every", 10**6, "--log", log)
    wait_until(lambda: log.exists() and len(log.read_text().split()) >= 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 74, err
    step = len(log.read_text().split())
    assert stderr_lines(err) == [f"savegame: the emergency checkpoint (step {step}) was not saved: {_reason(err)}"]
    assert "no space left" in err and "Traceback" not in err
    assert committed_steps(tmp_path / "checkpoints") == []


def test_saves_that_keep_failing_stop_the_run_with_74(tmp_path: Path) -> None:
    proc = counter(tmp_path, "--steps", 100, "--every", 1)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 74, err
    lines = stderr_lines(err)
    assert [line.split(":")[0] for line in lines[:-1]] == ["checkpoint at step 1 not saved",
                                                            "checkpoint at step 2 not saved",
                                                            "checkpoint at step 3 not saved"]
    assert lines[-1].startswith("savegame: 3 checkpoints in a row failed to save; stopping rather than training "
                                "on without a way back: ")
    assert "Traceback" not in err and "DONE" not in out


def _reason(err: str) -> str:
    """What the storage said (the part after 'was not saved: ')."""
    return err.strip().splitlines()[-1].split("was not saved: ", 1)[-1]
