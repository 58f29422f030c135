"""FSDP2 (fully_shard) jobs on CPU with gloo: a checkpoint saved by 2 ranks resumes on 1 and back on 2
(DCP reshards), with the model and optimizer state equal to what was saved; DCP's metadata is
JSON that a tampered copy cannot get past."""
from __future__ import annotations

import json
import pickle
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from dist_helpers import manifests, rank_files_complete, torchrun
from helpers import TESTS, clean_env

pytestmark = pytest.mark.frameworks

WORKER = str(TESTS / "workers" / "fsdp_worker.py")


def _run(nproc: int, run: Path, steps: int, dump: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([*torchrun(nproc), WORKER, "--dir", str(run), "--steps", str(steps), "--dump", str(dump)],
                          env=clean_env(env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def _same(a: Path, b: Path) -> None:
    saved, resumed = load_file(str(a)), load_file(str(b))
    assert sorted(saved) == sorted(resumed)
    for key in saved:
        assert saved[key].dtype == resumed[key].dtype and saved[key].equal(resumed[key]), key


def test_two_ranks_save_one_resumes_and_two_again(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _run(2, run, 3, tmp_path / "saved.safetensors")
    first = manifests(run)[-1]
    assert first["step"] == 3 and first["world_size"] == 2 and rank_files_complete(first)
    shards = json.loads((run / "ckpt-000000000003" / "dcp.json").read_text())["tensors"]["model.0.weight"]["chunks"]
    assert [c["sizes"] for c in shards] == [[5, 6], [4, 6]]  # 9 rows over 2 ranks: each wrote its own

    one = _run(1, run, 3, tmp_path / "one.safetensors")  # resharded 2 -> 1 (nothing more to train)
    assert "resumed from step 3" in one.stdout
    _same(tmp_path / "saved.safetensors", tmp_path / "one.safetensors")

    _run(1, run, 5, tmp_path / "five.safetensors")  # trains on as one rank, saves with world size 1
    assert manifests(run)[-1]["world_size"] == 1 and manifests(run)[-1]["step"] == 5
    back = _run(2, run, 5, tmp_path / "back.safetensors")  # resharded 1 -> 2
    assert "resumed from step 5" in back.stdout
    _same(tmp_path / "five.safetensors", tmp_path / "back.safetensors")


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a payload file and make the manifest agree (size, checksum), as a forger would."""
    import xxhash

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == name:
            entry["bytes"], entry["checksum"] = len(data), f"xxh3-128:{xxhash.xxh3_128_hexdigest(data)}"
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_metadata_is_refused_cleanly(tmp_path: Path) -> None:
    """A dcp.json altered behind the manifest's back fails its checksum; a forged one that passes it (a
    chunk past the tensor's end, a pickle in place of JSON) fails the parser: never unpickled, never
    loaded, and the standalone job falls back to the checkpoint before it."""
    run = tmp_path / "run"
    done = subprocess.run([*torchrun(2), WORKER, "--dir", str(run), "--steps", "4", "--every", "2", "--dump",
                           str(tmp_path / "d.safetensors")], env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    latest = run / "ckpt-000000000004"
    meta = json.loads((latest / "dcp.json").read_text())
    meta["tensors"]["model.0.weight"]["chunks"][1]["offsets"] = [7, 0]  # rows 7..10 of a 9-row tensor
    _rewrite(latest, "dcp.json", json.dumps(meta).encode())
    one = _run(1, run, 4, tmp_path / "one.safetensors")
    assert "resumed from step 2" in one.stdout, one.stdout
    assert "reaches past the tensor's size" in one.stderr, one.stderr[-3000:]

    # A forger's pickle in its place (DCP's own reader would unpickle its .metadata): refused as not JSON.
    earlier = run / "ckpt-000000000002"
    _rewrite(earlier, "dcp.json", pickle.dumps({"state_dict_metadata": {}}))
    latest.rename(tmp_path / "aside")
    bad = subprocess.run([*torchrun(1), WORKER, "--dir", str(run), "--steps", "2", "--dump", str(tmp_path / "x")],
                         env=clean_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 0, bad.stderr[-3000:]
    assert "dcp.json: not UTF-8 text" in bad.stderr or "dcp.json: not valid JSON" in bad.stderr, bad.stderr[-3000:]
    assert "fresh" in bad.stdout  # nothing else to resume from: it started over, loading nothing of it
