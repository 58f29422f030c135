"""Special files in a run folder (security review 9.9): a manifest or a payload that is a symlink to
/dev/zero, a FIFO, or a folder. savegame reads only regular files, never through a symlink, with
size caps: every command ends quickly (bounded here by timeouts and a memory limit), names the
problem, and damages nothing."""
from __future__ import annotations

import json
import os
import resource
import subprocess
from pathlib import Path

import pytest

from storage_kit import SAVEGAME, cli, rows_by_step, save_good
from savegame.errors import StorageError
from savegame.storage import CheckpointStore, copy_checkpoint, folder_name

pytestmark = pytest.mark.integration

BAD = 30
MEMORY_LIMIT = 2 << 30  # a savegame reading /dev/zero into memory fails fast instead of eating the machine


def limited(env: dict, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """savegame under an address-space limit, bounded in time (TimeoutExpired fails the test)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    proc = subprocess.run([SAVEGAME, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit)
    assert "Traceback" not in proc.stderr and "MemoryError" not in proc.stderr, proc.stderr[-3000:]
    return proc


def make_run(root: Path) -> Path:
    store = CheckpointStore(str(root))
    for step in (10, 20, BAD):
        save_good(store, step)
    return root / folder_name(BAD)


def replace_with(path: Path, kind: str) -> None:
    path.unlink()
    if kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-to-a-good-file":  # the bytes are right, but savegame never reads through a link
        path.symlink_to(path.parent.parent / folder_name(20) / path.name)
    else:
        raise AssertionError(kind)


KINDS = ["dev-zero", "fifo", "link-to-a-good-file"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_special_manifest_is_damage(kind, tmp_path: Path, savegame_env):
    root = tmp_path / "run"
    folder = make_run(root)
    manifest = folder / "manifest.json"
    if kind == "link-to-a-good-file":
        good = json.loads(manifest.read_text())
        (tmp_path / "elsewhere.json").write_text(json.dumps(good))
        manifest.unlink()
        manifest.symlink_to(tmp_path / "elsewhere.json")
    else:
        replace_with(manifest, kind)
    proc = limited(savegame_env, "ls", str(root), "--json", "--all")
    assert proc.returncode == 0, proc.stderr
    rows = rows_by_step(proc)
    assert rows[BAD]["status"] == "damaged", rows[BAD]
    assert ("symbolic link" if kind != "fifo" else "not a regular file") in rows[BAD]["problem"]
    assert [s for s, r in rows.items() if r["status"] == "committed"] == [10, 20]
    proc = limited(savegame_env, "verify", str(root))
    assert proc.returncode == 1 and f"step {BAD}: DAMAGED" in proc.stdout
    proc = limited(savegame_env, "prune", str(root), "--keep-last", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    assert os.path.lexists(manifest) and (folder / "model.bin").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_a_special_payload_is_never_read(kind, tmp_path: Path, savegame_env):
    root = tmp_path / "run"
    folder = make_run(root)
    replace_with(folder / "model.bin", kind)
    proc = limited(savegame_env, "verify", str(root), "--json")
    assert proc.returncode == 1, proc.stderr
    rows = {r["step"]: r for r in json.loads(proc.stdout)}
    assert rows[BAD]["ok"] is False and "not a regular file" in rows[BAD]["problems"][0], rows[BAD]
    assert rows[10]["ok"] and rows[20]["ok"]

    out = tmp_path / "restored"
    proc = limited(savegame_env, "restore", str(root), "--step", str(BAD), "--to", str(out))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert ("symbolic link" if kind != "fifo" else "not a regular file") in proc.stderr
    assert CheckpointStore(str(out)).list() == []


@pytest.mark.parametrize("kind", KINDS)
def test_the_mirror_never_uploads_a_special_payload(kind, tmp_path: Path):
    """The mirror's upload is copy_checkpoint; it runs in-process here, bounded by a thread join."""
    import threading

    root = tmp_path / "run"
    folder = make_run(root)
    replace_with(folder / "model.bin", kind)
    source, bucket = CheckpointStore(str(root)), CheckpointStore(f"memory://special-{kind}-{os.getpid()}/run")
    outcome: dict = {}

    def upload() -> None:
        try:
            copy_checkpoint(source, source.get(BAD), bucket)
        except StorageError as exc:  # CorruptCheckpoint is one
            outcome["error"] = str(exc)

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "the upload of a special file never ended"
    assert "error" in outcome and "model.bin" in outcome["error"]
    assert bucket.list() == [] and bucket.scan().incomplete == []
    copy_checkpoint(source, source.get(20), bucket)  # a regular checkpoint still goes
    assert [c.step for c in bucket.list()] == [20]


def test_a_symlinked_payload_folder_is_not_followed(tmp_path: Path, savegame_env):
    root = tmp_path / "run"
    store = CheckpointStore(str(root))
    with store.begin(BAD) as staged:
        staged.write_bytes("optim/state.bin", b"state" * 100)
        staged.commit()
    outside = tmp_path / "outside"
    (root / folder_name(BAD) / "optim").rename(outside)
    (root / folder_name(BAD) / "optim").symlink_to(outside)  # same bytes, reached through a link
    problems = store.verify(store.get(BAD))
    assert problems and problems[0].startswith("optim/state.bin: ")
    proc = cli(savegame_env, "restore", str(root), "--step", str(BAD), "--to", str(tmp_path / "out"), codes=[1])
    assert "symbolic link" in proc.stderr
