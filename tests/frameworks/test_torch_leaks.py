"""A training process killed with its DataLoader workers (the daemon SIGKILLs the whole group)
leaves nothing behind for good: the folders multiprocessing makes for passing tensors between
processes (pymp-*) are collected by the next run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.frameworks

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytorch_mnist_cnn.py"
ARGS = ["--epochs", "1", "--limit-batches", "20", "--batch-size", "32", "--num-workers", "2", "--log-every", "1"]


def pymp_folders(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("pymp"))


def test_sigkilled_dataloader_workers_leave_no_pymp_folders_behind(tmp_path: Path) -> None:
    tmp = tmp_path / "t"  # the processes' temp folder (short: AF_UNIX socket paths live in it)
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    env.update(TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    command = [sys.executable, str(EXAMPLE), *ARGS, "--dir", str(tmp_path / "run")]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("step 5 "):
            break
    os.killpg(proc.pid, signal.SIGKILL)  # the training process and its DataLoader workers, as the daemon does
    proc.wait()
    time.sleep(0.5)
    assert pymp_folders(tmp), "the killed run left no folder: this test proves nothing"
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert pymp_folders(tmp) == []
