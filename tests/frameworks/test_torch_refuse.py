"""Checkpoints savegame must not load: newer formats, altered bytes, pickles, other models.

Each is refused with an error that says what is wrong; a run on its own then resumes from the
checkpoint before it (the previous good state, bit for bit), and a supervised one exits 65 so the
daemon can choose another.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from savegame import Checkpointer, CorruptCheckpoint
from savegame.storage import CheckpointStore
from savegame.storage.checksum import Hasher
from savegame.torch import weights_sha256

pytestmark = pytest.mark.frameworks


def make_model(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)


def checkpointer(run_dir: Path, seed: int = 99) -> tuple[Checkpointer, nn.Module, torch.optim.Optimizer]:
    model, optimizer, scheduler = make_model(seed)
    ckpt = Checkpointer(str(run_dir), monitor="val_acc", mode="max", handle_signals=False)
    ckpt.track(model=model, optimizer=optimizer, scheduler=scheduler)
    return ckpt, model, optimizer


def train(ckpt: Checkpointer, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        optimizer.step()
        ckpt.step()


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SAVEGAME_"):
            monkeypatch.delenv(key)


@pytest.fixture
def two_checkpoints(tmp_path: Path) -> tuple[Path, str, str]:
    """A run folder with good checkpoints at steps 3 and 6; returns (folder, sha at 3, sha at 6)."""
    run_dir = tmp_path / "run"
    ckpt, model, optimizer = checkpointer(run_dir, seed=1)
    train(ckpt, model, optimizer, 3)
    ckpt.save(wait=True)
    at_3 = weights_sha256(model)
    train(ckpt, model, optimizer, 3)
    ckpt.save(wait=True)
    at_6 = weights_sha256(model)
    ckpt.close()
    assert [c.step for c in CheckpointStore(str(run_dir)).list()] == [3, 6]
    return run_dir, at_3, at_6


def _rewrite_manifest(folder: Path, change: Callable[[dict], None]) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _add_file(folder: Path, relpath: str, data: bytes) -> None:
    (folder / relpath).write_bytes(data)
    hasher = Hasher()
    hasher.update(data)

    def change(manifest: dict) -> None:
        manifest["files"] = [f for f in manifest["files"] if f["path"] != relpath]
        manifest["files"].append({"path": relpath, "bytes": len(data), "checksum": hasher.digest()})
    _rewrite_manifest(folder, change)


def state_format_99(folder: Path, tmp_path: Path) -> None:
    state = json.loads((folder / "state.json").read_text())
    state["format"] = 99
    _add_file(folder, "state.json", json.dumps(state).encode())  # consistent checksum: only the format is new


def manifest_format_99(folder: Path, tmp_path: Path) -> None:
    _rewrite_manifest(folder, lambda m: m.update(format=99))


def tampered_payload(folder: Path, tmp_path: Path) -> None:
    path = folder / "state.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x01  # one bit of the last tensor's data; nothing else is touched
    path.write_bytes(bytes(data))


class _Trap:
    """Unpickling this creates a folder: proof that something unpickled the payload."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.mkdir, (self.marker,))


def pickle_payload(folder: Path, tmp_path: Path) -> None:
    _add_file(folder, "model.pt", pickle.dumps({"state_dict": _Trap(str(tmp_path / "UNPICKLED"))}))


DAMAGES = {
    "state-format-99": (state_format_99, "state format 99 is newer than this savegame reads"),
    "manifest-format-99": (manifest_format_99, "manifest format 99 is newer than this savegame reads"),
    "tampered-payload": (tampered_payload, "checksum mismatch: the file was altered or damaged"),
    "pickle-payload": (pickle_payload, "model.pt may be a pickle; savegame never loads pickles"),
}


def test_untouched_checkpoint_resumes_from_the_latest(two_checkpoints: tuple[Path, str, str]) -> None:
    run_dir, at_3, at_6 = two_checkpoints
    ckpt, model, _ = checkpointer(run_dir)
    assert weights_sha256(model) not in (at_3, at_6)
    info = ckpt.restore()
    assert info is not None and info.step == 6 and ckpt.progress.step == 6
    assert weights_sha256(model) == at_6
    ckpt.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_refused_and_falls_back_to_the_previous_checkpoint(damage: str, two_checkpoints: tuple[Path, str, str],
                                                           tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_dir, at_3, _ = two_checkpoints
    apply, message = DAMAGES[damage]
    apply(run_dir / "ckpt-000000000006", tmp_path)
    ckpt, model, optimizer = checkpointer(run_dir)
    with caplog.at_level(logging.WARNING, logger="savegame"):
        info = ckpt.restore()
    assert message in caplog.text, caplog.text
    assert info is not None and info.step == 3 and ckpt.progress.step == 3
    assert weights_sha256(model) == at_3  # the damaged checkpoint left nothing behind in the model
    assert all(float(s["step"]) == 3 for s in optimizer.state_dict()["state"].values())
    assert not (tmp_path / "UNPICKLED").exists()
    ckpt.close()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_supervised_worker_exits_65_on_a_damaged_resume_checkpoint(
        damage: str, two_checkpoints: tuple[Path, str, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    run_dir, _, _ = two_checkpoints
    apply, message = DAMAGES[damage]
    apply(run_dir / "ckpt-000000000006", tmp_path)
    monkeypatch.setenv("SAVEGAME_DIR", str(run_dir))
    monkeypatch.setenv("SAVEGAME_RESUME_FROM", str(run_dir / "ckpt-000000000006"))
    monkeypatch.setenv("SAVEGAME_EVENTS", str(tmp_path / "nobody-listens.sock"))
    ckpt, _, _ = checkpointer(run_dir)
    with caplog.at_level(logging.WARNING, logger="savegame"), pytest.raises(SystemExit) as exited:
        ckpt.restore()
    assert exited.value.code == 65
    assert message in caplog.text, caplog.text
    assert not (tmp_path / "UNPICKLED").exists()
    ckpt.close()


def test_a_damaged_only_checkpoint_does_not_silently_train_on_partly_read_weights(tmp_path: Path) -> None:
    """The tensors are read straight into the model and checked as they stream: when the last
    checkpoint there is turns out damaged, starting from scratch would train on garbage."""
    run_dir = tmp_path / "run"
    ckpt, model, optimizer = checkpointer(run_dir, seed=1)
    train(ckpt, model, optimizer, 2)
    ckpt.save(wait=True)
    ckpt.close()
    tampered_payload(run_dir / "ckpt-000000000002", tmp_path)
    ckpt, model, _ = checkpointer(run_dir)
    with pytest.raises(CorruptCheckpoint, match="cannot start from scratch either"):
        ckpt.restore()
    ckpt.close()


def test_a_checkpoint_of_another_model_is_refused_before_touching_this_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt, model, optimizer = checkpointer(run_dir, seed=1)
    train(ckpt, model, optimizer, 2)
    ckpt.save(wait=True)
    ckpt.close()
    torch.manual_seed(5)
    other = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 5))  # one more output
    before = weights_sha256(other)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=other, optimizer=torch.optim.Adam(other.parameters()))
    with pytest.raises(SystemExit) as exited:  # a script that does not fit its folder: exit 78, not retried
        ckpt.restore()
    assert exited.value.code == 78
    assert weights_sha256(other) == before  # and the model was not touched on the way
    ckpt.close()


def test_files_stay_loadable_by_the_safetensors_package(two_checkpoints: tuple[Path, str, str]) -> None:
    from safetensors.torch import load_file

    run_dir, _, at_6 = two_checkpoints
    tensors = load_file(str(run_dir / "ckpt-000000000006" / "state.safetensors"))
    model, _, _ = make_model(0)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    assert weights_sha256(model) == at_6
