"""Damaged checkpoints, seen through the real CLI: verify names the checkpoint and the problem and
exits 1; ls and prune keep working and never delete a damaged checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration

SAVEGAME = str(Path(sys.executable).parent / "savegame")
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
DAMAGED_STEP = 200


def cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([SAVEGAME, *args], env=env, capture_output=True, text=True, timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def make_run(root: Path) -> None:
    store = CheckpointStore(str(root))
    for step in (100, 200, 300, 400):
        with store.begin(step) as staged:
            staged.write_bytes("model.bin", PAYLOAD)
            staged.write_bytes("meta/trainer.json", b'{"lr": 0.1}')
            staged.commit(epoch=step // 100, metrics={"val_acc": 0.5 + step / 10_000})


def damage(root: Path, kind: str) -> None:
    folder = root / f"ckpt-{DAMAGED_STEP:012d}"
    model, manifest = folder / "model.bin", folder / "manifest.json"
    if kind == "truncated":
        model.write_bytes(PAYLOAD[: len(PAYLOAD) // 2])
    elif kind == "flipped":
        data = bytearray(PAYLOAD)
        data[777_777] ^= 0x10
        model.write_bytes(bytes(data))
    elif kind == "missing-file":
        model.unlink()
    elif kind == "missing-manifest":
        manifest.unlink()
    elif kind == "garbled-manifest":
        manifest.write_bytes(manifest.read_bytes()[:40] + b"\x00\xff garbage")
    elif kind == "future-format":
        data = json.loads(manifest.read_bytes())
        manifest.write_text(json.dumps({**data, "format": 99, "shards": ["a new thing"]}))
    else:
        raise AssertionError(kind)


# kind -> (what verify says about it, whether the manifest still lists it as committed)
KINDS = {
    "truncated": ("model.bin: 524288 bytes, the manifest says 1048576 (truncated)", True),
    "flipped": ("model.bin: checksum mismatch", True),
    "missing-file": ("model.bin: missing", True),
    "missing-manifest": ("no manifest.json", False),
    "garbled-manifest": ("manifest.json: not UTF-8 text", False),
    "future-format": ("manifest format 99 is newer than this savegame reads (1); upgrade savegame", False),
}


@pytest.fixture(params=sorted(KINDS))
def damaged_run(request, tmp_path: Path):
    root = tmp_path / "run"
    make_run(root)
    damage(root, request.param)
    return request.param, root


@pytest.mark.parametrize("kind", sorted(k for k in KINDS if k != "missing-manifest"))  # that one: below
def test_verify_names_the_checkpoint_and_the_problem(kind, tmp_path: Path, savegame_env):
    root = tmp_path / "run"
    make_run(root)
    damage(root, kind)
    proc = cli(savegame_env, "verify", str(root))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    bad = [line for line in lines if line.startswith(f"step {DAMAGED_STEP}:")]
    assert len(bad) == 1 and "DAMAGED" in bad[0] and KINDS[kind][0] in bad[0], proc.stdout
    assert sorted(line for line in lines if line.endswith(": ok")) == \
        ["step 100: ok", "step 300: ok", "step 400: ok"]

    proc = cli(savegame_env, "verify", str(root), "--json")
    assert proc.returncode == 1
    rows = {r["step"]: r for r in json.loads(proc.stdout)}
    assert sorted(rows) == [100, 200, 300, 400]
    assert rows[DAMAGED_STEP]["ok"] is False
    assert any(KINDS[kind][0] in p for p in rows[DAMAGED_STEP]["problems"])
    assert rows[DAMAGED_STEP]["path"].endswith(f"ckpt-{DAMAGED_STEP:012d}")
    assert all(rows[s]["ok"] and rows[s]["problems"] == [] for s in (100, 300, 400))

    # --step picks one: the damaged one fails, a good one passes
    assert cli(savegame_env, "verify", str(root), "--step", str(DAMAGED_STEP)).returncode == 1
    assert cli(savegame_env, "verify", str(root), "--step", "300").returncode == 0


def test_ls_keeps_working(damaged_run, savegame_env):
    kind, root = damaged_run
    proc = cli(savegame_env, "ls", str(root), "--json")
    assert proc.returncode == 0, proc.stderr
    still_committed = KINDS[kind][1]
    committed = [r["step"] for r in json.loads(proc.stdout)]  # --json: committed checkpoints only
    assert committed == ([100, 200, 300, 400] if still_committed else [100, 300, 400])
    proc = cli(savegame_env, "ls", str(root), "--json", "--all")
    assert proc.returncode == 0, proc.stderr
    rows = {r["step"]: r for r in json.loads(proc.stdout)}
    assert sorted(rows) == [100, 200, 300, 400]
    assert (rows[DAMAGED_STEP]["status"] == "committed") == still_committed
    if not still_committed:
        assert rows[DAMAGED_STEP]["status"] in ("damaged", "incomplete")
        assert rows[DAMAGED_STEP]["problem"]
    text = cli(savegame_env, "ls", str(root))
    assert text.returncode == 0 and str(DAMAGED_STEP) in text.stdout and "400" in text.stdout


def test_prune_never_deletes_a_damaged_checkpoint(damaged_run, savegame_env):
    kind, root = damaged_run
    damaged_folder = root / f"ckpt-{DAMAGED_STEP:012d}"
    before = sorted(p.relative_to(damaged_folder) for p in damaged_folder.rglob("*"))

    dry = cli(savegame_env, "prune", str(root), "--keep-last", "1", "--keep-best", "0", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    planned = json.loads(dry.stdout)
    assert DAMAGED_STEP not in [d["step"] for d in planned["delete"]]
    assert {d["step"] for d in planned["delete"]} == {100, 300}
    if KINDS[kind][1]:  # still committed: prune found the damage itself and says so
        why = {k["step"]: k["why"] for k in planned["keep"]}[DAMAGED_STEP]
        assert why[0].startswith("damaged, kept for inspection") and KINDS[kind][0] in why[0]

    proc = cli(savegame_env, "prune", str(root), "--keep-last", "1", "--keep-best", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {d["step"] for d in result["delete"]} == {100, 300}
    assert sorted(p.relative_to(damaged_folder) for p in damaged_folder.rglob("*")) == before
    assert not (root / "ckpt-000000000100").exists() and not (root / "ckpt-000000000300").exists()
    assert cli(savegame_env, "verify", str(root), "--step", "400").returncode == 0
    assert cli(savegame_env, "prune", str(root), "--keep-last", "1").returncode == 0  # again: still fine
    assert damaged_folder.is_dir()


def test_verify_mentions_folders_without_a_manifest(tmp_path: Path, savegame_env):
    """No manifest: not a checkpoint (an unfinished save or delete, or its leftover, collected when
    stale), so not damage either: verify names it without failing, `ls --all` lists it as incomplete."""
    root = tmp_path / "run"
    make_run(root)
    damage(root, "missing-manifest")
    proc = cli(savegame_env, "verify", str(root))
    assert proc.returncode == 0, proc.stdout
    assert f"1 folder(s) without a manifest" in proc.stdout and f"ckpt-{DAMAGED_STEP:012d}" in proc.stdout
    rows = {r["step"]: r for r in json.loads(cli(savegame_env, "ls", str(root), "--json", "--all").stdout)}
    assert rows[DAMAGED_STEP]["status"] == "incomplete"
