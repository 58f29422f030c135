"""Getting the model out: `savegame export` writes a plain safetensors state_dict (no prefix) and
`savegame.torch.load_weights` loads "best" by the run's stored policy, verified, into a CPU model,
a meta-device model (map_location), never installing signal handlers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

import savegame.torch as st
from savegame import Checkpointer, CorruptCheckpoint
from savegame.errors import ConfigError

pytestmark = pytest.mark.frameworks
SAVEGAME = str(Path(sys.executable).parent / "savegame")
VAL_ACC = [0.5, 0.9, 0.7]  # the best is epoch 2


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[int, str]]]:
    """A standalone run of 3 epochs monitored by val_acc (max); the weights' hash at each epoch's end."""
    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("SAVEGAME_")]
             if k != "SAVEGAME_CACHE_DIR"}  # no daemon here; put back when the module is done
    folder = tmp_path_factory.mktemp("export") / "run"
    torch.manual_seed(0)
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpointer(str(folder), monitor="val_acc", mode="max", handle_signals=False, verbose=0)
    ckpt.track(model=model, optimizer=optimizer)
    ckpt.restore()
    hashes = {}
    for epoch in ckpt.epochs(3):
        for _ in ckpt.batches(range(4)):
            optimizer.zero_grad()
            model(torch.randn(16, 4)).square().mean().backward()
            optimizer.step()
        ckpt.end_epoch(val_acc=VAL_ACC[epoch])
        hashes[ckpt.progress.step] = st.weights_sha256(model)
    ckpt.finish()
    yield folder, hashes
    os.environ.update(saved)


def export(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    return subprocess.run([SAVEGAME, "export", *args], capture_output=True, text=True, env=env, timeout=120)


def test_export_best_is_a_plain_state_dict(run: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    folder, hashes = run
    done = export(str(folder), "--best", "--to", str(tmp_path / "best.safetensors"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("exported step 8 (epoch 2, best)"), done.stdout
    model = net()
    model.load_state_dict(load_file(str(tmp_path / "best.safetensors")))  # as it is: no prefix, no extras
    assert st.weights_sha256(model) == hashes[8]
    done = export(str(folder), "--latest", "--to", str(tmp_path / "latest.safetensors"))
    assert done.returncode == 0, done.stderr
    model.load_state_dict(load_file(str(tmp_path / "latest.safetensors")))
    assert st.weights_sha256(model) == hashes[12]


def test_export_refuses_what_it_cannot_do(run: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    folder, _ = run
    done = export(str(folder), "--step", "4", "--to", str(tmp_path / "x.pt"))
    assert done.returncode == 78 and "Traceback" not in done.stderr, done.stderr
    assert ".safetensors" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = export(str(folder), "--step", "5", "--to", str(tmp_path / "x.safetensors"))
    assert done.returncode != 0 and "Traceback" not in done.stderr and not (tmp_path / "x.safetensors").exists()


def test_load_weights_best_latest_and_step(run: tuple[Path, dict[int, str]]) -> None:
    folder, hashes = run
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    model = net()
    assert st.load_weights(model, str(folder)).step == 8  # which="best": the stored policy's val_acc, max
    assert st.weights_sha256(model) == hashes[8]
    assert st.load_weights(model, str(folder), which="latest").step == 12
    assert st.weights_sha256(model) == hashes[12]
    st.load_weights(model, str(folder), which=4)
    assert st.weights_sha256(model) == hashes[4]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # load-only: no handlers


def test_map_location_loads_into_a_model_without_memory(run: tuple[Path, dict[int, str]]) -> None:
    """The tutorial's map_location case: the model is built where its weights are not (here the "meta"
    device, as a large model is); the checkpoint's tensors land on map_location."""
    folder, hashes = run
    with torch.device("meta"):
        model = net()
    st.load_weights(model, str(folder), which="best", map_location="cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert st.weights_sha256(model) == hashes[8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: run on a machine with CUDA")
def test_a_checkpoint_saved_from_cuda_loads_on_the_cpu(tmp_path: Path) -> None:
    model = net().cuda()
    ckpt = Checkpointer(str(tmp_path / "gpu"), handle_signals=False, verbose=0)
    ckpt.track(model=model)
    ckpt.restore()
    ckpt.step()
    ckpt.finish()
    cpu = net()
    st.load_weights(cpu, str(tmp_path / "gpu"), which="latest", map_location="cpu")
    assert st.weights_sha256(cpu) == st.weights_sha256(model)
    state, _ = st.load_state_dict(str(tmp_path / "gpu"), which="latest", map_location="cuda")
    assert {t.device.type for t in state.values()} == {"cuda"}


def test_load_weights_refuses_damage_and_another_model(run: tuple[Path, dict[int, str]], tmp_path: Path) -> None:
    folder, _ = run
    with pytest.raises(ConfigError, match="does not fit this model"):
        st.load_weights(torch.nn.Linear(4, 2), str(folder))
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    target = copy / "ckpt-000000000008" / "state.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match="checksum"):
        st.load_weights(net(), str(copy), which=8)
