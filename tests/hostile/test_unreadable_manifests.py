"""An unreadable manifest is damage, never garbage (security review 9.2).

Only a folder whose manifest is really absent is the leftover of an unfinished save. One whose
manifest cannot be read (EACCES, EIO, a folder in its place, a bucket that keeps failing the GET)
is listed as damaged with its problem and never collected, however old, by `prune`, by the
daemon's start, by the mirror's listing or by a standalone worker (all go through
CheckpointStore.collect_garbage).

A real EACCES needs a process without CAP_DAC_OVERRIDE: the CLI and the worker run under
`setpriv` with every capability dropped (still uid 0, so the files stay theirs to delete).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import COUNTER_WORKER, clean_env
from storage_kit import LATER, cli, rows_by_step, save_good
from savegame.storage import CheckpointStore, folder_name

pytestmark = pytest.mark.integration

DAMAGED = 30
TWO_HOURS_AGO = time.time() - 7200
NO_CAPS = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]


def tree(path: Path) -> dict[str, bytes | None]:
    """Everything under a folder (as root): relative path -> bytes (None for folders)."""
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def make_run(root: Path) -> Path:
    """Good checkpoints 10 and 20, and step 30 whose manifest is there; everything two hours old."""
    store = CheckpointStore(str(root))
    for step in (10, 20, DAMAGED):
        save_good(store, step)
    folder = root / folder_name(DAMAGED)
    for path in [folder, *folder.rglob("*")]:
        os.utime(path, (TWO_HOURS_AGO, TWO_HOURS_AGO), follow_symlinks=False)
    return folder


@pytest.fixture
def unprivileged():
    """A command prefix that runs as uid 0 without capabilities: file modes apply, as to any user."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop capabilities")
    probe = Path(f"/tmp/savegame-caps-probe-{os.getpid()}")
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        denied = subprocess.run([*NO_CAPS, "cat", str(probe)], capture_output=True).returncode != 0
    finally:
        probe.unlink()
    if not denied:
        pytest.skip("dropping capabilities does not make file modes apply here")
    return NO_CAPS


def assert_damaged_not_collected(root: Path, folder: Path, before: dict, problem: str) -> None:
    store = CheckpointStore(str(root))
    scan = store.scan()
    assert [(p.step, problem in p.problem) for p in scan.damaged] == [(DAMAGED, True)], scan
    assert not scan.incomplete
    assert store.collect_garbage(now=LATER) == []
    assert tree(folder) == before
    assert store.garbage(now=LATER) == []  # and `prune --dry-run` does not offer it either


# ---------------------------------------------------------------- local disk

def test_a_folder_in_place_of_the_manifest(tmp_path: Path, savegame_env):
    root = tmp_path / "run"
    folder = make_run(root)
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").mkdir()
    os.utime(folder, (TWO_HOURS_AGO, TWO_HOURS_AGO))
    before = tree(folder)
    assert_damaged_not_collected(root, folder, before, "manifest.json")
    proc = cli(savegame_env, "prune", str(root), "--keep-last", "5", "--json", codes=[0])
    assert json.loads(proc.stdout)["collected"] == [] and tree(folder) == before
    rows = rows_by_step(cli(savegame_env, "ls", str(root), "--json", "--all"))
    assert rows[DAMAGED]["status"] == "damaged" and "not a regular file" in rows[DAMAGED]["problem"]


def test_an_io_error_on_the_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """EIO cannot be made on demand here: it is injected where the manifest is opened for reading."""
    import savegame.storage.local as local_module

    root = tmp_path / "run"
    folder = make_run(root)
    before = tree(folder)
    real_os_open, real_open = os.open, open

    def is_the_manifest(path, dir_fd) -> bool:
        base = os.readlink(f"/proc/self/fd/{dir_fd}") if dir_fd is not None else ""
        return os.path.join(base, str(path)) == str(folder / "manifest.json")

    def failing_os_open(path, flags, *args, dir_fd=None, **kwargs):
        if is_the_manifest(path, dir_fd) and not flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real_os_open(path, flags, *args, dir_fd=dir_fd, **kwargs)

    def failing_open(file, mode="r", *args, **kwargs):
        if is_the_manifest(file, None) and "r" in mode:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", failing_os_open)
    monkeypatch.setattr(local_module, "open", failing_open, raising=False)  # how older code read it
    assert_damaged_not_collected(root, folder, before, "Input/output error")


@pytest.mark.parametrize("what", ["manifest", "folder"])
def test_permission_denied(what, tmp_path: Path, savegame_env, unprivileged):
    root = tmp_path / "run"
    folder = make_run(root)
    before = tree(folder)
    target = folder / "manifest.json" if what == "manifest" else folder
    target.chmod(0)
    try:
        proc = cli(savegame_env, "prune", str(root), "--keep-last", "5", "--json", codes=[0], prefix=unprivileged)
        assert json.loads(proc.stdout)["collected"] == []
        rows = rows_by_step(cli(savegame_env, "ls", str(root), "--json", "--all", prefix=unprivileged))
        assert rows[DAMAGED]["status"] == "damaged" and "Permission denied" in rows[DAMAGED]["problem"]
        assert [r["step"] for r in rows.values() if r["status"] == "committed"] == [10, 20]
        # a standalone worker collects stale staging when it restores: it must leave this alone
        worker = subprocess.run([*unprivileged, sys.executable, COUNTER_WORKER, "--steps", "25", "--every", "5"],
                                env=clean_env({"SAVEGAME_DIR": str(root)}),
                                capture_output=True, text=True, timeout=120)
        assert worker.returncode == 0, worker.stderr[-3000:]
    finally:
        target.chmod(0o755 if what == "folder" else 0o644)
    assert tree(folder) == before
    assert 25 in [c.step for c in CheckpointStore(str(root)).list()]


# ---------------------------------------------------------------- a bucket that fails the GET

@pytest.fixture
def bucket_through_proxy(s3_server, fault_proxy):
    bucket = s3_server.make_bucket()
    url = f"s3://{bucket}/run"
    direct = CheckpointStore(url, s3_server.storage_options)
    for step in (10, 20, DAMAGED):
        save_good(direct, step)
    options = {"key": "testing", "secret": "testing", "skip_instance_cache": True,
               "client_kwargs": {"endpoint_url": fault_proxy.endpoint},
               "config_kwargs": {"retries": {"max_attempts": 1}}}
    return url, direct, options


def proxied_store(url: str, options: dict) -> CheckpointStore:
    store = CheckpointStore(url, options)
    store._backend.fs.retries = 1  # s3fs's own retries would hide the faults (and take long)
    return store


def bucket_files(direct: CheckpointStore, step: int) -> list[str]:
    fs = direct._backend.fs
    fs.invalidate_cache()
    return sorted(fs.find(direct._backend.full(folder_name(step))))


def test_a_manifest_the_bucket_keeps_failing_is_damaged_not_garbage(bucket_through_proxy, fault_proxy):
    url, direct, options = bucket_through_proxy
    before = bucket_files(direct, DAMAGED)
    fault_proxy.fail("GET", rf"{folder_name(DAMAGED)}/manifest\.json$", 503)
    store = proxied_store(url, options)
    scan = store.scan()
    assert [c.step for c in scan.committed] == [10, 20]
    assert [p.step for p in scan.damaged] == [DAMAGED] and "unreadable" in scan.damaged[0].problem
    assert not scan.incomplete
    gets = [p for m, p in fault_proxy.seen if m == "GET" and p.endswith(f"{folder_name(DAMAGED)}/manifest.json")]
    assert len(gets) >= 3, "a failed manifest read is retried"
    assert store.collect_garbage(now=LATER) == []
    assert bucket_files(direct, DAMAGED) == before
    fault_proxy.clear()
    fault_proxy.rules.clear()
    assert [c.step for c in proxied_store(url, options).list()] == [10, 20, DAMAGED]


@pytest.mark.parametrize("fault, times", [(503, 2), ("reset", 5)])  # the client itself retries resets 3 times
def test_a_transient_error_on_a_manifest_is_retried(bucket_through_proxy, fault_proxy, fault, times):
    url, direct, options = bucket_through_proxy
    fault_proxy.fail("GET", rf"{folder_name(DAMAGED)}/manifest\.json$", fault, times=times)
    store = proxied_store(url, options)
    scan = store.scan()
    assert [c.step for c in scan.committed] == [10, 20, DAMAGED] and not scan.damaged and not scan.incomplete
    assert store.collect_garbage(now=LATER) == []
    assert bucket_files(direct, DAMAGED)
