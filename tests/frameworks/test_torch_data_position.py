"""The data position of a plain loop: torchdata's StatefulDataLoader (tracked) resumes mid-epoch
exactly; a plain DataLoader(shuffle=True) cannot, and says so once, pointing to ResumableSampler."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.frameworks

SCRIPT = r'''
import os, signal, sys
import torch
from torch.utils.data import DataLoader, TensorDataset
from savegame import Checkpointer
from savegame.torch import weights_sha256

kind, folder, stop_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
data = TensorDataset(torch.randn(96, 4), torch.randn(96, 1))
if kind == "stateful":
    from torchdata.stateful_dataloader import StatefulDataLoader
    loader = StatefulDataLoader(data, batch_size=8, shuffle=True)
else:
    loader = DataLoader(data, batch_size=8, shuffle=True)
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
ckpt = Checkpointer(folder, every_epochs=1, verbose=0)
ckpt.track(model=model, optimizer=optimizer, **({"loader": loader} if kind == "stateful" else {}))
ckpt.restore()
for epoch in ckpt.epochs(3):
    for x, y in ckpt.batches(loader):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        if ckpt.progress.step + 1 == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # as the daemon does: saved at this step's end, exit 75
    ckpt.end_epoch()
ckpt.finish()
print("final-weights-sha256", weights_sha256(model))
'''


def run(kind: str, folder: Path, stop_at: int = 0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    return subprocess.run([sys.executable, "-c", SCRIPT, kind, str(folder), str(stop_at)], capture_output=True,
                          text=True, env=env, timeout=180)


def final_hash(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 0, done.stderr[-3000:]
    return re.findall(r"^final-weights-sha256 (\w+)$", done.stdout, re.M)[-1]


def test_stateful_dataloader_resumes_mid_epoch_exactly(tmp_path: Path) -> None:
    reference = final_hash(run("stateful", tmp_path / "ref"))
    for stop_at in (5, 17):  # mid-epoch in epochs 1 and 2 (12 batches each)
        stopped = run("stateful", tmp_path / "run", stop_at)
        assert stopped.returncode == 75, stopped.stderr[-3000:]
    resumed = run("stateful", tmp_path / "run")
    assert "warning" not in resumed.stderr, resumed.stderr
    assert final_hash(resumed) == reference


def test_plain_shuffling_dataloader_warns_once_at_a_mid_epoch_resume(tmp_path: Path) -> None:
    assert run("shuffle", tmp_path / "run", 5).returncode == 75
    resumed = run("shuffle", tmp_path / "run")
    warnings = [line for line in resumed.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "DataLoader(shuffle=True)" in warnings[0] and "ResumableSampler" in warnings[0], \
        resumed.stderr
    final_hash(resumed)
