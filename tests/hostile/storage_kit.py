"""Shared by the hostile storage tests: real run folders (local and on the S3 server), hand-made
manifests, and the real `savegame` executable run with a time limit."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import xxhash

from savegame.storage import CheckpointStore, folder_name

SAVEGAME = str(Path(sys.executable).parent / "savegame")
LATER = time.time() + 10 * 24 * 3600  # "now", ten days on: every leftover is stale by then
PAYLOAD = b"weights" * 1000


def cli(env: dict, *args: str, timeout: float = 60, codes: Iterable[int] = (0, 1),
        prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run savegame; it must end in time, with an expected code, one-line errors and no traceback."""
    proc = subprocess.run([*prefix, SAVEGAME, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    assert proc.returncode in tuple(codes), (args, proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(proc.stderr.strip().splitlines()) <= 3, proc.stderr[-3000:]
    return proc


def base_manifest(step: int, payload: bytes = PAYLOAD) -> dict[str, Any]:
    """A valid manifest for a folder holding model.bin = `payload`."""
    return {"format": 1, "step": step, "epoch": 1, "reason": "periodic", "created": "2026-11-26T04:09:10Z",
            "metrics": {"val_loss": 0.5}, "framework": "torch", "run_id": "r1", "resumed_from": None,
            "files": [{"path": "model.bin", "bytes": len(payload),
                       "checksum": f"xxh3-128:{xxhash.xxh3_128_hexdigest(payload)}"}]}


def save_good(store: CheckpointStore, step: int, **commit: Any) -> None:
    with store.begin(step) as staged:
        staged.write_bytes("model.bin", PAYLOAD)
        staged.commit(**{"epoch": 1, "metrics": {"val_loss": 1.0 / step}, **commit})


class RunRoot:
    """A run root on local disk or in a bucket, with raw access that bypasses savegame."""

    def __init__(self, url: str, fs: Any, root: str, storage_options: Optional[dict] = None,
                 env: Optional[dict] = None) -> None:
        self.url, self.fs, self.root, self.storage_options, self.env = url, fs, root, storage_options, env or {}
        self.local = "://" not in url

    def store(self) -> CheckpointStore:
        return CheckpointStore(self.url, self.storage_options)

    def put(self, rel: str, data: bytes) -> None:
        path = f"{self.root}/{rel}"
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.fs.pipe_file(path, data)

    def put_checkpoint(self, step: int, manifest: bytes | dict, payload: bytes = PAYLOAD) -> None:
        """A folder holding model.bin and the given manifest (bytes as they are, or a dict as JSON)."""
        raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        self.put(f"{folder_name(step)}/model.bin", payload)
        self.put(f"{folder_name(step)}/manifest.json", raw)

    def files(self) -> set[str]:
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix):] for p in found if p.startswith(prefix)}


def local_root(path: Path) -> RunRoot:
    import fsspec

    path.mkdir(parents=True, exist_ok=True)
    return RunRoot(str(path), fsspec.filesystem("file"), str(path))


def s3_root(server: Any) -> RunRoot:
    import s3fs

    bucket = server.make_bucket()
    fs = s3fs.S3FileSystem(**server.storage_options, skip_instance_cache=True)
    return RunRoot(f"s3://{bucket}/run", fs, f"{bucket}/run", server.storage_options, server.env)


def rows_by_step(proc: subprocess.CompletedProcess) -> dict[int, dict]:
    """`ls --json --all` output, strictly parsed (no NaN or Infinity), by step."""
    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON, yet savegame printed it")

    return {r["step"]: r for r in json.loads(proc.stdout, parse_constant=refuse)}
