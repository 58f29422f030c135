"""The run's shared-memory folder: made private, never taken over when someone else could have
planted it (a symlink, loose permissions, another owner)."""
from __future__ import annotations

import os
import stat

import pytest

from savegame.snapshot.folder import clear, folder_for, prepare_folder, remove

pytestmark = pytest.mark.unit


def test_the_folder_is_made_private_and_keyed_by_the_run(tmp_path):
    path = prepare_folder(str(tmp_path / "run"), root=str(tmp_path))
    assert path == folder_for(str(tmp_path / "run"), root=str(tmp_path))
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
    assert folder_for(str(tmp_path / "other"), root=str(tmp_path)) != path
    assert folder_for(str(tmp_path / "run"), root=str(tmp_path), node="b") != path


def test_a_planted_symlink_or_a_loose_folder_is_not_used(tmp_path):
    run = str(tmp_path / "run")
    path = folder_for(run, root=str(tmp_path))
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    os.symlink(target, path)
    assert prepare_folder(run, root=str(tmp_path)) is None
    os.unlink(path)
    os.mkdir(path, 0o777)
    os.chmod(path, 0o777)
    assert prepare_folder(run, root=str(tmp_path)) is None
    remove(path)  # not ours to remove either
    assert os.path.isdir(path)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to make a folder another user owns")
def test_a_folder_of_another_user_is_not_used(tmp_path):
    run = str(tmp_path / "run")
    path = folder_for(run, root=str(tmp_path))
    os.mkdir(path, 0o700)
    os.chown(path, 65534, 65534)
    assert prepare_folder(run, root=str(tmp_path)) is None


def test_clear_removes_one_process_segments_or_all(tmp_path):
    path = prepare_folder(str(tmp_path / "run"), root=str(tmp_path))
    for name in ("seg-10-0", "seg-10-1", "seg-11-0"):
        open(os.path.join(path, name), "wb").close()
    assert clear(path, pid=10) == 2 and os.listdir(path) == ["seg-11-0"]
    assert clear(path) == 1 and os.listdir(path) == []


def test_without_shared_memory_there_is_no_folder(tmp_path):
    assert prepare_folder(str(tmp_path / "run"), root=str(tmp_path / "missing")) is None
