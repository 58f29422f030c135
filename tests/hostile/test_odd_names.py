"""Odd folder names in a run folder (security review 9.10): a staging folder whose "pid" is huge, zero
or not ASCII, and checkpoint-like names that are not exactly ckpt-<12 ASCII digits>. Nothing
crashes; a pid that is not a pid means "writer unknown" (only age decides); a name that is not a
checkpoint's is not one."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import COUNTER_WORKER, clean_env
from storage_kit import LATER, cli, save_good
from savegame.storage import CheckpointStore, folder_name

HOST = socket.gethostname()
ODD_PIDS = ["99999999999999999999", "0", "4294967297", "²³", "٣٢"]


def staging_names() -> list[str]:
    return [f"ckpt-000000000001.{HOST}.{pid}.abcd1234" for pid in ODD_PIDS]


@pytest.fixture
def run(tmp_path: Path) -> Path:
    root = tmp_path / "run"
    store = CheckpointStore(str(root))
    for step in (10, 20):
        save_good(store, step)
    for name in staging_names():
        (root / ".staging" / name).mkdir()
        (root / ".staging" / name / "model.bin").write_bytes(b"half")
    return root


@pytest.mark.integration
def test_odd_pids_in_staging_names(run: Path, savegame_env):
    store = CheckpointStore(str(run))
    assert store.collect_garbage() == []  # fresh, writer unknown: kept for now
    assert sorted(os.listdir(run / ".staging")) == sorted(staging_names())
    cli(savegame_env, "prune", str(run), "--keep-last", "5", "--dry-run", "--json", codes=[0])
    proc = cli(savegame_env, "prune", str(run), "--keep-last", "5", codes=[0])
    assert "Traceback" not in proc.stderr
    worker = subprocess.run([sys.executable, COUNTER_WORKER, "--steps", "25", "--every", "5"],
                            env=clean_env({"SAVEGAME_DIR": str(run)}), capture_output=True, text=True, timeout=120)
    assert worker.returncode == 0, worker.stderr[-3000:]
    assert [c.step for c in store.list()][-1] == 25
    assert sorted(store.collect_garbage(now=LATER)) == sorted(f".staging/{n}" for n in staging_names())


@pytest.mark.integration
@pytest.mark.parametrize("name", ["ckpt-٠٠٠٠٠٠٠٠٠٠١٠", "ckpt-000000000010\n", "ckpt-00000000001０"])
def test_names_that_only_look_like_a_step(name: str, run: Path, savegame_env):
    """Not ASCII digits, or a trailing newline: not a checkpoint folder, whatever its manifest says."""
    (run / name).mkdir()
    (run / name / "manifest.json").write_bytes((run / folder_name(10) / "manifest.json").read_bytes())
    (run / name / "model.bin").write_bytes((run / folder_name(10) / "model.bin").read_bytes())
    store = CheckpointStore(str(run))
    assert [c.step for c in store.list()] == [10, 20]
    store.delete(10)
    assert (run / name / "manifest.json").exists()



@pytest.mark.unit
@pytest.mark.parametrize("pid", [0, -1, 2**70, 10**20, True, "12", None])
def test_process_alive_of_what_is_not_a_pid(pid):
    from savegame.storage.local import process_alive

    assert process_alive(pid) is False  # type: ignore[arg-type]


@pytest.mark.unit
def test_process_alive_of_real_processes():
    from savegame.storage.local import process_alive

    assert process_alive(os.getpid()) is True
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_alive(child.pid) is False
