"""Symlinks planted in a run folder (security review 9.6, storage part): savegame never follows a link
below the run root when it lists for deletion, deletes or moves; and `check_run_folder` refuses a
run folder another user could plant them in."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from storage_kit import LATER, cli, save_good
from savegame.errors import CheckpointExists, ConfigError, StorageError
from savegame.storage import CheckpointStore, folder_name

pytestmark = pytest.mark.integration

OLD = time.time() - 7200
NOBODY = 65534


def tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


def age(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        os.utime(p, (OLD, OLD), follow_symlinks=False)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Someone else's data, two hours old, shaped like staging leftovers and checkpoints."""
    elsewhere = tmp_path / "elsewhere"
    for name in ("ckpt-000000000001.otherhost.1.abcd1234", "precious-results", "ckpt-000000000007"):
        (elsewhere / name).mkdir(parents=True)
        (elsewhere / name / "data.bin").write_bytes(name.encode())
    save_good(CheckpointStore(str(elsewhere)), 8)
    age(elsewhere)
    return elsewhere


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    store = CheckpointStore(str(root))
    for step in (10, 20):
        save_good(store, step)
    return root


def test_a_symlinked_staging_folder_is_never_followed(run: Path, outside: Path, savegame_env):
    before = tree(outside)
    (run / ".staging").rmdir()
    (run / ".staging").symlink_to(outside)
    store = CheckpointStore(str(run))
    with pytest.raises(StorageError, match=r"\.staging is a symbolic link"):
        store.collect_garbage(now=LATER)
    assert tree(outside) == before
    proc = cli(savegame_env, "prune", str(run), "--keep-last", "5", codes=[1])
    assert ".staging is a symbolic link" in proc.stderr and "remove it" in proc.stderr
    assert tree(outside) == before
    with pytest.raises(StorageError, match=r"\.staging is a symbolic link"):
        store.begin(30)  # nor does a save write through it
    assert tree(outside) == before and [c.step for c in store.list()] == [10, 20]


def test_a_symlinked_quarantine_folder_is_never_followed(run: Path, outside: Path):
    before = tree(outside)
    (run / ".quarantine").symlink_to(outside)
    store = CheckpointStore(str(run))
    assert store.scan().quarantined == []  # what lies behind the link is not listed
    with pytest.raises(StorageError, match=r"\.quarantine is a symbolic link"):
        store.quarantine(20, "suspect")
    assert tree(outside) == before
    assert [c.step for c in store.list()] == [10, 20] and store.verify(store.get(20)) == []


def test_a_symlinked_checkpoint_folder_is_neither_listed_nor_deleted_through(run: Path, outside: Path):
    before = tree(outside)
    (run / folder_name(8)).symlink_to(outside / folder_name(8))
    store = CheckpointStore(str(run))
    assert [c.step for c in store.list()] == [10, 20]
    with pytest.raises(StorageError, match="symbolic link"):
        store.delete(8)
    with pytest.raises(CheckpointExists, match="in the way"):
        store.begin(8)  # nor is a save of that step renamed over it
    assert tree(outside) == before
    assert store.collect_garbage(now=LATER) == [] and tree(outside) == before


def test_removing_a_leftover_never_follows_a_link_inside_it(run: Path, outside: Path):
    before = tree(outside)
    leftover = run / folder_name(30)
    leftover.mkdir()
    (leftover / "model.bin").symlink_to(outside / "precious-results" / "data.bin")
    (leftover / "optim").symlink_to(outside / "precious-results")
    age(leftover)
    store = CheckpointStore(str(run))
    assert store.collect_garbage(now=LATER) == [folder_name(30)]
    assert not os.path.lexists(leftover) and tree(outside) == before


# ---------------------------------------------------------------- check_run_folder

def check_run_folder(path: str) -> None:
    from savegame.storage.local import check_run_folder as check  # the daemon and the worker call it at start

    check(path)


@pytest.fixture
def mine(tmp_path: Path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    return folder


def test_a_folder_of_my_own_is_fine(mine: Path, tmp_path: Path):
    check_run_folder(str(mine))
    CheckpointStore(str(mine)).begin(1).abort()  # .staging now exists, as a real folder
    check_run_folder(str(mine))
    (tmp_path / "link").symlink_to(mine)
    check_run_folder(str(tmp_path / "link"))


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")


def test_a_folder_owned_by_another_user(mine: Path, root_only):
    os.chown(mine, NOBODY, NOBODY)
    with pytest.raises(ConfigError) as info:
        check_run_folder(str(mine))
    message = str(info.value)
    assert str(mine) in message and f"uid {NOBODY}" in message and "not by you" in message
    assert "chown -R" in message


@pytest.mark.parametrize("mode, who", [(0o777, "group and others"), (0o775, "its group"), (0o757, "group and others")])
def test_a_folder_others_may_write_to(mine: Path, mode: int, who: str):
    os.chown(mine, -1, NOBODY)  # a group that is not the user's own private group
    mine.chmod(mode)
    with pytest.raises(ConfigError) as info:
        check_run_folder(str(mine))
    assert who in str(info.value) and f"chmod go-w {mine}" in str(info.value) and f"{mode:04o}" in str(info.value)


def test_a_user_private_group_may_write(mine: Path):
    """umask 002 with user-private groups (Debian, Ubuntu): the group is the user alone."""
    import grp
    import pwd

    me = pwd.getpwuid(os.geteuid())
    if [m for m in grp.getgrgid(me.pw_gid).gr_mem if m != me.pw_name]:
        pytest.skip("this user's primary group has other members")
    os.chown(mine, -1, me.pw_gid)
    mine.chmod(0o775)
    check_run_folder(str(mine))


def test_a_symlink_to_a_folder_of_another_user(mine: Path, tmp_path: Path, root_only):
    os.chown(mine, NOBODY, NOBODY)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(ConfigError, match=f"a symlink to {mine}.* is owned by .*uid {NOBODY}"):
        check_run_folder(str(tmp_path / "link"))


def test_a_symlink_owned_by_another_user(mine: Path, tmp_path: Path, root_only):
    (tmp_path / "link").symlink_to(mine)
    os.lchown(tmp_path / "link", NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"is a symlink owned by .*uid {NOBODY}"):
        check_run_folder(str(tmp_path / "link"))


@pytest.mark.parametrize("name", [".staging", ".quarantine", ".savegame"])
def test_a_symlinked_folder_of_savegame_inside(mine: Path, tmp_path: Path, name: str):
    (mine / name).symlink_to(tmp_path)
    with pytest.raises(ConfigError, match=f"{name} is a symbolic link or not a folder"):
        check_run_folder(str(mine))


def test_a_missing_folder(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_run_folder(str(tmp_path / "nope"))
