"""Crafted safetensors payloads whose checksums are valid (recomputed into the manifest), so only
the worker's own checks can catch them. Each is refused by a real worker process with one line
and no traceback: 78 when the tensors do not fit the live model, 65 when the file is malformed.
"""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from savegame.storage.checksum import Hasher

pytestmark = pytest.mark.frameworks

STEP_DIR = "ckpt-000000000002"
TORCH_WORKER = """
import torch
from torch import nn
from savegame import Checkpointer
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
ckpt = Checkpointer()
ckpt.track(model=model, optimizer=optimizer)
ckpt.restore()
for _ in range(2 - ckpt.progress.step):
    optimizer.zero_grad()
    model(torch.randn(4, 8)).pow(2).mean().backward()
    optimizer.step()
    ckpt.step()
ckpt.finish()
print("finished", flush=True)
"""
NUMPY_WORKER = """
import numpy as np
from savegame import Checkpointer
weights = np.zeros((16, 8), dtype=np.float32)
ckpt = Checkpointer()
ckpt.track(weights=weights, counts=np.zeros(3, dtype=np.int64))
ckpt.restore()
for _ in range(2 - ckpt.progress.step):
    weights += 1
    ckpt.step()
ckpt.finish()
print("finished", flush=True)
"""

Tensors = list[tuple[str, str, list[int], bytes]]  # name, dtype, shape, bytes: in file order


# -- reading and writing a checkpoint's safetensors file, checksums recomputed ---------------------

def read_tensors(folder: Path) -> tuple[dict[str, Any], Tensors]:
    raw = (folder / "state.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    metadata = header.pop("__metadata__", {})
    data = raw[8 + length:]
    entries = sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
    return metadata, [(n, e["dtype"], e["shape"], data[e["data_offsets"][0]:e["data_offsets"][1]]) for n, e in entries]


def layout(tensors: Tensors, metadata: Any) -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    return header, b"".join(t[3] for t in tensors)


def write_file(folder: Path, header_json: bytes, data: bytes) -> None:
    """Replace state.safetensors and put its true size and checksum into the manifest."""
    payload = struct.pack("<Q", len(header_json)) + header_json + data
    (folder / "state.safetensors").write_bytes(payload)
    hasher = Hasher()
    hasher.update(payload)
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "state.safetensors":
            entry["bytes"], entry["checksum"] = len(payload), hasher.digest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def rewrite(folder: Path, change: Callable[[dict[str, Any], Tensors], Optional[bytes]]) -> None:
    """`change(metadata holder, tensors)` edits the tensors in place, or returns the raw header to write."""
    metadata, tensors = read_tensors(folder)
    holder = {"metadata": metadata}
    raw = change(holder, tensors)
    header, data = layout(tensors, holder["metadata"])
    write_file(folder, raw if raw is not None else json.dumps(header).encode(), data)


def retype(name: str, dtype: str, shape: list[int], itemsize: int) -> Callable[[dict, Tensors], None]:
    def change(_holder: dict, tensors: Tensors) -> None:
        i = [t[0] for t in tensors].index(name)
        count = 1
        for dim in shape:
            count *= dim
        tensors[i] = (name, dtype, shape, bytes(count * itemsize))
    return change


# -- the cases ------------------------------------------------------------------------------------

def claims(shape: list[int]) -> Callable[[dict, Tensors], bytes]:
    """An optimizer tensor (nothing in the model to compare with) claiming `shape`, its offsets to match."""
    def change(holder: dict, tensors: Tensors) -> bytes:
        name = "optimizer.state.0.exp_avg"
        rest = [t for t in tensors if t[0] != name]
        header, data = layout(rest, holder["metadata"])
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [len(data), len(data) + 4 * count]}
        return json.dumps(header).encode()
    return change


def string_offsets(holder: dict, tensors: Tensors) -> bytes:
    header, _ = layout(tensors, holder["metadata"])
    start, end = header["optimizer.state.0.exp_avg"]["data_offsets"]
    header["optimizer.state.0.exp_avg"]["data_offsets"] = [str(start), str(end)]
    return json.dumps(header).encode()


def negative_dims(holder: dict, tensors: Tensors) -> bytes:
    header, _ = layout(tensors, holder["metadata"])
    header["optimizer.state.0.exp_avg"]["shape"] = [-16, -8]  # the product still matches the byte count
    return json.dumps(header).encode()


def metadata_list(holder: dict, tensors: Tensors) -> None:
    holder["metadata"] = ["format", "savegame"]


def deep_nesting(holder: dict, tensors: Tensors) -> bytes:
    header, _ = layout(tensors, holder["metadata"])
    text = json.dumps(header)
    return (text[:-1] + ', "junk": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()


def duplicate_offsets(holder: dict, tensors: Tensors) -> bytes:
    header, _ = layout(tensors, holder["metadata"])
    header["model.2.bias"]["data_offsets"] = list(header["model.0.bias"]["data_offsets"])[:1] + \
        [header["model.0.bias"]["data_offsets"][0] + 16]  # 4 floats, over model.0.bias' bytes
    return json.dumps(header).encode()


def overlapping_offsets(holder: dict, tensors: Tensors) -> bytes:
    header, _ = layout(tensors, holder["metadata"])
    start, end = header["model.0.bias"]["data_offsets"]
    header["model.0.bias"]["data_offsets"] = [start - 8, end - 8]
    return json.dumps(header).encode()


TORCH_CASES = {
    "bool-weights": (retype("model.0.weight", "BOOL", [16, 8], 1), 78, "model.0.weight", "does not fit this model"),
    "int32-weights": (retype("model.0.weight", "I32", [16, 8], 4), 78, "model.0.weight", "does not fit this model"),
    "transposed-weights": (retype("model.0.weight", "F32", [8, 16], 4), 78, "model.0.weight",
                           "does not fit this model"),
    "huge-shape": (claims([2**20, 2**20]), 65, "optimizer.state.0.exp_avg", "beyond the end of the file"),
    "overflowing-shape": (claims([2**40, 2**40]), 65, "optimizer.state.0.exp_avg", "out of range"),
    "string-offsets": (string_offsets, 65, "optimizer.state.0.exp_avg", "data_offsets"),
    "negative-dims": (negative_dims, 65, "optimizer.state.0.exp_avg", "shape"),
    "metadata-of-the-wrong-type": (metadata_list, 65, "__metadata__", "must be an object of strings"),
    "nested-deeply": (deep_nesting, 65, "safetensors header", "nested more than"),
    "duplicate-offsets": (duplicate_offsets, 65, "model.2.bias", "overlap"),
    "overlapping-offsets": (overlapping_offsets, 65, "model.0.bias", "overlap"),
}
NUMPY_CASES = {
    "int32-for-float": (retype("weights", "I32", [16, 8], 4), 78, "weights", "does not fit this model"),
    "other-shape": (retype("weights", "F32", [8, 16], 4), 78, "weights", "does not fit this model"),
    "unsupported-dtype": (retype("counts", "F8_E4M3", [3], 1), 78, "counts", "does not fit this model"),
}


def run_worker(script: str, run_dir: Path, resume: Optional[Path], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET"))}
    env["SAVEGAME_DIR"] = str(run_dir)
    if resume is not None:  # as the daemon starts it: a chosen checkpoint, events to a socket
        env.update(SAVEGAME_RESUME_FROM=str(resume), SAVEGAME_EVENTS=str(tmp_path / "daemon.sock"))
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("trained")
    runs = {}
    for name, script in (("torch", TORCH_WORKER), ("numpy", NUMPY_WORKER)):
        done = run_worker(script, where / name, None, where)
        assert done.returncode == 0 and "finished" in done.stdout, done.stderr
        runs[name] = where / name / STEP_DIR
    return runs


def check_refused(case: tuple, script: str, source: Path, tmp_path: Path) -> None:
    change, code, tensor, words = case
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir / STEP_DIR)
    rewrite(run_dir / STEP_DIR, change)
    done = run_worker(script, run_dir, run_dir / STEP_DIR, tmp_path)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-3000:]
    assert tensor in lines[0] and words in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(TORCH_CASES))
def test_torch_worker_refuses_a_crafted_payload(case: str, trained: dict[str, Path], tmp_path: Path) -> None:
    check_refused(TORCH_CASES[case], TORCH_WORKER, trained["torch"], tmp_path)


@pytest.mark.parametrize("case", sorted(NUMPY_CASES))
def test_numpy_worker_refuses_a_crafted_payload(case: str, trained: dict[str, Path], tmp_path: Path) -> None:
    check_refused(NUMPY_CASES[case], NUMPY_WORKER, trained["numpy"], tmp_path)


def test_the_crafting_alone_changes_nothing(trained: dict[str, Path], tmp_path: Path) -> None:
    """Rewriting a file with nothing changed must still load: the refusals above are the checks' doing."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained["torch"], run_dir / STEP_DIR)
    rewrite(run_dir / STEP_DIR, lambda holder, tensors: None)
    done = run_worker(TORCH_WORKER, run_dir, run_dir / STEP_DIR, tmp_path)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-3000:]
