"""Found by an adversarial review (each case failed before its fix) (issue 8 E16/E20, B): a full or read-only run folder in the middle of a run.

They need root (tmpfs mounts, an ext4 loop device).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import Daemon, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def _mount_tmpfs(mnt: Path, size: str) -> None:
    mnt.mkdir(exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    # Made now: on some kernels a file cannot even be created once the disk is full (CI failed so).
    (mnt / "filler").touch()


def _fill(mnt: Path, leave: int = 0) -> None:
    st = os.statvfs(mnt)
    with open(mnt / "filler", "ab") as f:
        try:
            f.write(b"x" * max(0, st.f_bavail * st.f_frsize - leave))
            while not leave:
                f.write(b"x" * 65536)
        except OSError:
            pass


def test_a_nearly_full_disk_at_start_exits_74_not_a_traceback(tmp_path):
    """One free page: the write probe passes, then run_id / settings.json fail with a raw traceback, exit 1."""
    mnt = tmp_path / "nf"
    _mount_tmpfs(mnt, "128k")
    try:
        (mnt / "run").mkdir(mode=0o750)
        _fill(mnt, leave=8192)
        result = savegame("run", "--dir", str(mnt / "run"), "--", sys.executable, "-c", "pass")
        assert "Traceback" not in result.stderr, result.stderr
        assert result.returncode == 74, result.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_sigterm_on_a_full_disk_does_not_exit_0(tmp_path):
    """The emergency checkpoint cannot be committed. The worker's exit_io() prints to its stderr, which
    is .savegame/worker.err on the same full disk: print raises, the worker exits 1 instead of 74, and
    the daemon says "no emergency checkpoint: the last one stands" and exits 0 (README: 74)."""
    mnt = tmp_path / "full"
    _mount_tmpfs(mnt, "8m")
    try:
        run = mnt / "run"
        run.mkdir(mode=0o750)
        d = Daemon(run, counter("--steps", 100000, "--every", 100000, "--sleep", 0.01, "--size-mb", 0.5)).start()
        d.ready()
        _fill(mnt)
        time.sleep(0.5)
        d.signal(signal.SIGTERM)
        code = d.wait(timeout=60)
        assert code == 74, d.stderr[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_disk_that_fills_up_is_not_taken_for_a_crash_loop(tmp_path):
    """A worker that prints (as every training script does) dies of ENOSPC on its own stdout file the
    moment the disk is full: the daemon calls it a crash, sets a verified checkpoint aside ("died 3 times
    right after loading step N"), falls back to an older one, and gives up with exit 1, not 74."""
    mnt = tmp_path / "full"
    _mount_tmpfs(mnt, "32m")  # room for the retained checkpoints however slowly the test gets to fill it
    try:
        run = mnt / "run"
        run.mkdir(mode=0o750)
        d = Daemon(run, counter("--steps", 100000, "--every", 50, "--sleep", 0.01, "--size-mb", 0.5, "--print"),
                   ["--max-restarts", "3"]).start()
        d.ready()
        wait_until(lambda: list(run.glob("ckpt-*")), timeout=30)
        _fill(mnt)
        code = d.wait(timeout=120)
        log = d.stderr
        assert "setting step" not in log and "falling back" not in log, log[-3000:]
        assert code == 74, log[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_run_folder_remounted_read_only_mid_run_is_not_an_internal_error(tmp_path):
    """ext4 errors=remount-ro: the next restart opens .savegame/progress with O_CREAT and dies with
    'internal error' and a traceback (exit 1)."""
    img, mnt = tmp_path / "ext.img", tmp_path / "ext"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "64M", str(img)], check=True)
    if subprocess.run(["mkfs.ext4", "-q", str(img)], capture_output=True).returncode or \
            subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(img), str(mnt)],
                           capture_output=True).returncode:
        pytest.skip("cannot mount an ext4 loop device here")
    try:
        dev = os.path.basename(subprocess.run(["findmnt", "-no", "SOURCE", str(mnt)], capture_output=True,
                                              text=True).stdout.strip())
        trigger = Path(f"/sys/fs/ext4/{dev}/trigger_fs_error")
        if not trigger.exists():
            pytest.skip("no trigger_fs_error")
        run = mnt / "run"
        run.mkdir(mode=0o750)
        d = Daemon(run, counter("--steps", 100000, "--every", 20, "--sleep", 0.01, "--size-mb", 0.1),
                   ["--max-restarts", "2"], logs=tmp_path).start()  # the daemon's own log off the broken disk
        d.ready()
        trigger.write_text("1")
        code = d.wait(timeout=120)
        assert "internal error" not in d.stderr and "Traceback" not in d.stderr, d.stderr[-3000:]
        assert code in (74, 78), d.stderr[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
