"""The local commit's durability, observed for real: every fsync, rename and unlink the store makes is
recorded (with the path behind each descriptor) and checked against the contract:

    write and fsync every payload file and the manifest, fsync every staging folder, rename the
    staging folder into place, fsync the run root; to delete, remove the manifest and fsync its
    folder before anything else goes.

Leaving out any one of those fsyncs fails a test here (a crash would otherwise lose a checkpoint
that was reported committed, or bring back a deleted one).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration

FILES = {"model.bin": os.urandom(3 << 20), "optim/state.bin": b"state" * 1000, "optim/deeper/rng.bin": b"r",
         "empty.bin": b""}


def _where(fd_or_path, dir_fd=None) -> str:
    if isinstance(fd_or_path, int):
        return os.readlink(f"/proc/self/fd/{fd_or_path}")
    if dir_fd is not None:
        return os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), os.fspath(fd_or_path))
    return os.path.abspath(os.fspath(fd_or_path))


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(what, path) of every fsync, rename and unlink from now on, in order."""
    seen: list[tuple[str, str]] = []
    real_fsync, real_rename, real_unlink = os.fsync, os.rename, os.unlink

    def fsync(fd):
        seen.append(("fsync", _where(fd)))
        return real_fsync(fd)

    def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        seen.append(("rename", f"{_where(src, src_dir_fd)} -> {_where(dst, dst_dir_fd)}"))
        return real_rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def unlink(path, *, dir_fd=None):
        seen.append(("unlink", _where(path, dir_fd)))
        return real_unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "unlink", unlink)
    return seen


def index(events: list[tuple[str, str]], what: str, path: str) -> int:
    """Where the last `what` of `path` happened (ValueError if it never did)."""
    for i in range(len(events) - 1, -1, -1):
        if events[i] == (what, path):
            return i
    raise ValueError(f"no {what} of {path} in {events}")


def save(store: CheckpointStore, step: int) -> None:
    with store.begin(step) as staged:
        for rel, data in FILES.items():
            staged.write_bytes(rel, data)
        staged.commit(epoch=1)


def test_a_commit_syncs_everything_before_the_rename_and_the_root_after(tmp_path: Path, events):
    root = tmp_path / "run"
    store = CheckpointStore(str(root))
    save(store, 1)
    renames = [(i, path) for i, (what, path) in enumerate(events) if what == "rename"]
    assert len(renames) == 1, events
    at, move = renames[0]
    staging, final = move.split(" -> ")
    assert Path(final) == root / "ckpt-000000000001" and Path(staging).parent == root / ".staging"

    for rel in [*FILES, "manifest.json"]:
        assert index(events, "fsync", f"{staging}/{rel}") < at, f"{rel} is not synced before the rename"
    manifest_synced = index(events, "fsync", f"{staging}/manifest.json")
    for folder in ("", "/optim", "/optim/deeper"):
        # a folder's fsync makes its entries durable: after its last file exists, before the rename
        assert manifest_synced < index(events, "fsync", staging + folder) < at, f"staging{folder} not synced"
    assert index(events, "fsync", str(root)) > at, "the run root is not synced after the rename"
    assert CheckpointStore(str(root)).verify(store.get(1)) == []


def test_a_delete_syncs_the_manifest_removal_before_removing_anything_else(tmp_path: Path, events):
    root = tmp_path / "run"
    store = CheckpointStore(str(root))
    save(store, 1)
    save(store, 2)
    events.clear()
    store.delete(1)
    folder = str(root / "ckpt-000000000001")
    unlinks = [i for i, (what, _path) in enumerate(events) if what == "unlink"]
    assert events[unlinks[0]] == ("unlink", f"{folder}/manifest.json"), events
    synced = index(events, "fsync", folder)
    assert unlinks[0] < synced < unlinks[1], "the manifest's removal is not synced before the payload goes"
    assert [c.step for c in store.list()] == [2]
