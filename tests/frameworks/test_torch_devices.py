"""Checkpoints move between devices: a GPU-saved checkpoint restores on a CPU-only machine.

Tensors are always read into CPU memory; the model's own CPU tensors are filled in place, anything
else (GPU parameters, non-contiguous views, optimizer state) goes through `load_state_dict`, which
copies to each parameter's device. The real GPU-to-CPU test needs CUDA and is skipped without it;
the CPU tests cover the same path (load_state_dict, a checkpoint carrying CUDA RNG states) here.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from savegame import Checkpointer
from savegame.storage.checksum import Hasher
from savegame.torch import weights_sha256
from savegame.worker.safetensors_io import TensorBlob, parse_header, write_safetensors

pytestmark = pytest.mark.frameworks


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SAVEGAME_"):
            monkeypatch.delenv(key)


def _train_and_save(run_dir: Path, device: str, steps: int = 3) -> tuple[str, dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=model, optimizer=optimizer)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(4, 8, device=device)).sum().backward()
        optimizer.step()
        ckpt.step()
    ckpt.finish()
    moments = {k: v["exp_avg"].cpu().clone() for k, v in optimizer.state_dict()["state"].items()}
    return weights_sha256(model), moments


RESTORE_ON_CPU = r'''
import json, sys, torch
from torch import nn
from savegame import Checkpointer
from savegame.torch import weights_sha256
assert not torch.cuda.is_available()
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
ckpt = Checkpointer(sys.argv[1], handle_signals=False)
ckpt.track(model=model, optimizer=optimizer)
info = ckpt.restore()
state = optimizer.state_dict()["state"]
print(json.dumps({"step": info.step, "sha": weights_sha256(model),
                  "devices": sorted({t.device.type for s in state.values() for t in s.values()}),
                  "exp_avg0": state[0]["exp_avg"].flatten()[:4].tolist()}))
'''


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to save from")
def test_gpu_saved_checkpoint_restores_on_a_cpu_only_machine(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sha, moments = _train_and_save(run_dir, "cuda")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-c", RESTORE_ON_CPU, str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["step"] == 3 and r["sha"] == sha and r["devices"] == ["cpu"]
    assert r["exp_avg0"] == moments[0].flatten()[:4].tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_checkpoint_restores_onto_a_gpu_model(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sha, _ = _train_and_save(run_dir, "cpu")
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=model, optimizer=optimizer)
    assert ckpt.restore() is not None
    assert weights_sha256(model) == sha
    assert {t.device.type for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)} == {"cuda"}
    ckpt.close()


def _add_cuda_rng_states(folder: Path) -> None:
    """Make a CPU checkpoint look GPU-saved: the RNG states of two CUDA devices, as a GPU run writes them."""
    tensors_path, state_path = folder / "state.safetensors", folder / "state.json"
    raw = tensors_path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    infos, metadata = parse_header(raw[8:8 + length], "test")
    data = memoryview(raw)[8 + length:]
    blobs = [TensorBlob(i.name, i.dtype, i.shape, data[i.start:i.end]) for i in infos]
    blobs += [TensorBlob(f"rng.cuda.{d}", "U8", (16,), memoryview(bytes(range(16)))) for d in range(2)]
    with open(tensors_path, "wb") as f:
        write_safetensors(f, blobs, metadata)
    state = json.loads(state_path.read_text())
    state["adapter"]["rng"]["__dict__"]["cuda"] = [{"__tensor__": f"rng.cuda.{d}"} for d in range(2)]
    state_path.write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["files"]:
        hasher = Hasher()
        hasher.update((folder / entry["path"]).read_bytes())
        entry["bytes"], entry["checksum"] = hasher.bytes, hasher.digest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_checkpoint_with_cuda_rng_states_restores_on_cpu(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    sha, moments = _train_and_save(run_dir, "cpu")
    _add_cuda_rng_states(run_dir / "ckpt-000000000003")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=model, optimizer=optimizer)
    info = ckpt.restore()
    assert info is not None and info.step == 3
    assert weights_sha256(model) == sha
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], moments[0])
    ckpt.close()


class Transposed(nn.Module):
    """Parameters that are not contiguous (a transposed view): they cannot be read into in place."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 8).t())
        self.register_buffer("scale", torch.ones(8)[::2])  # a strided view

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale.repeat(2)) @ self.weight


def test_tensors_that_cannot_be_read_in_place_go_through_load_state_dict(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    torch.manual_seed(0)
    model = Transposed()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=model, optimizer=optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        with torch.no_grad():
            model.scale.mul_(1.5)
        ckpt.step()
    ckpt.finish()
    sha = weights_sha256(model)
    torch.manual_seed(1)
    fresh = Transposed()
    assert not fresh.weight.is_contiguous() and weights_sha256(fresh) != sha
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=fresh, optimizer=torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9))
    assert ckpt.restore() is not None
    assert weights_sha256(fresh) == sha
    assert not fresh.weight.is_contiguous()  # loaded into the model's own (strided) tensor
    ckpt.close()
