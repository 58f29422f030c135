"""The PyTorch MNIST example keeps the examples' contract: its flags, --data-root, the last line."""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.frameworks

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pytorch_mnist_cnn.py"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}


def _write_idx(path: Path, array: np.ndarray) -> None:
    dims = b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    header = bytes([0, 0, 8, array.ndim]) + dims
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_flags_of_the_examples_contract() -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE), "--help"], env=_env(), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    for flag in ("--epochs", "--seed", "--batch-size", "--dir", "--data-root", "--num-workers", "--lr",
                 "--limit-batches", "--deterministic"):
        assert flag in done.stdout, flag


def test_full_mnist_layout_from_data_root_with_sgd(tmp_path: Path) -> None:
    """--data-root reads the four (gzipped) idx files of full MNIST; the run ends with the hash line
    and saves into SAVEGAME_DIR when --dir is not given."""
    rng = np.random.default_rng(0)
    data = tmp_path / "mnist"
    data.mkdir()
    for stem, count in (("train", 320), ("t10k", 100)):
        _write_idx(data / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(data / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, count))
    env = {**_env(), "SAVEGAME_DIR": str(tmp_path / "run")}
    done = subprocess.run([sys.executable, str(EXAMPLE), "--epochs", "1", "--data-root", str(data),
                           "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"final-weights-sha256 [0-9a-f]{64}", last), last
    assert "epoch 1/1: val_loss" in done.stdout
    assert sorted(p.name for p in (tmp_path / "run").glob("ckpt-*")) == ["ckpt-000000000010"]  # 320 / 32
    assert not (tmp_path / "checkpoints").exists()
