"""replace_file: the one way small files (status, settings, records, run id, textfile) are written."""
from __future__ import annotations

import os
import stat

import pytest

from savegame.files import replace_file

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("durable", [False, True])
def test_the_new_content_replaces_the_old_whole_and_nothing_else_is_left(tmp_path, durable):
    path = tmp_path / "status.json"
    path.write_bytes(b"old")
    replace_file(str(path), b"new" * 100_000, durable=durable)
    assert path.read_bytes() == b"new" * 100_000
    assert os.listdir(tmp_path) == ["status.json"]


def test_a_link_planted_at_the_path_is_replaced_never_written_through(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "status.json").symlink_to(victim)
    replace_file(str(tmp_path / "status.json"), b"new")
    assert victim.read_bytes() == b"keep me"
    assert not (tmp_path / "status.json").is_symlink() and (tmp_path / "status.json").read_bytes() == b"new"


def test_the_mode_is_the_one_asked_for(tmp_path):
    replace_file(str(tmp_path / "cache.json"), b"{}", mode=0o600)
    assert stat.S_IMODE(os.stat(tmp_path / "cache.json").st_mode) == 0o600


def test_a_failed_replace_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "status.json"
    path.mkdir()  # a folder in its place: os.replace fails after the write
    (path / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        replace_file(str(path), b"new")
    assert sorted(os.listdir(tmp_path)) == ["status.json"] and (path / "inside").read_bytes() == b"x"
