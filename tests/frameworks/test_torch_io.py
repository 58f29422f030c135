"""How the PyTorch state reaches storage: one host buffer, page-aligned direct writes, exact bytes back.

Large page-aligned writes to a local disk bypass the page cache (O_DIRECT); the header, odd-sized
tails and object stores take the ordinary path. Whatever the path, the file is a valid safetensors
file whose checksum verifies and which restores bit for bit.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from savegame import Checkpointer
from savegame.storage import CheckpointStore
from savegame.torch import weights_sha256

pytestmark = pytest.mark.frameworks
PAGE = 4096


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("SAVEGAME_"):
            monkeypatch.delenv(key)


class Odd(nn.Module):
    """~3.4 MB in tensors of awkward sizes and dtypes: nothing ends on a page boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Linear(1000, 777)  # 3,108,000 + 3,108 bytes
        self.half_ = nn.Parameter(torch.randn(333, 101, dtype=torch.bfloat16))
        self.register_buffer("counts", torch.arange(4097, dtype=torch.uint8))
        self.register_buffer("flags", torch.rand(13) > 0.5)


def _model(seed: int) -> Odd:
    torch.manual_seed(seed)
    return Odd()


def _resident_pages(path: Path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file), by mincore(2)."""
    import numpy

    size = path.stat().st_size
    pages = -(-size // PAGE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        address = int(numpy.frombuffer(mapped, dtype=numpy.uint8).ctypes.data)  # maps, reads nothing
        if libc.mincore(ctypes.c_void_p(address), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
    return sum(v & 1 for v in vec), pages


def _filesystem(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _dev, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def test_odd_sized_state_round_trips_exactly(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    model = _model(0)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=model)
    ckpt.step()
    ckpt.save(wait=True)
    ckpt.close()
    store = CheckpointStore(str(run_dir))
    info = store.latest()
    assert info is not None and store.verify(info) == []
    path = run_dir / info.name / "state.safetensors"
    raw = path.read_bytes()
    header = struct.unpack("<Q", raw[:8])[0]
    assert (8 + header) % PAGE == 0, "the tensor data must start on a page boundary"
    loaded = load_file(str(path))  # the safetensors package reads it as it is
    for name, t in model.state_dict().items():
        assert torch.equal(loaded[f"model.{name}"], t), name
    fresh = _model(1)
    assert weights_sha256(fresh) != weights_sha256(model)
    ckpt = Checkpointer(str(run_dir), handle_signals=False)
    ckpt.track(model=fresh)
    assert ckpt.restore() is not None
    assert weights_sha256(fresh) == weights_sha256(model)
    ckpt.close()


def test_large_writes_bypass_the_page_cache_on_a_local_disk(tmp_path: Path) -> None:
    kind = _filesystem(tmp_path)
    if kind not in ("ext4", "xfs", "btrfs"):
        pytest.skip(f"{tmp_path} is on {kind or 'an unknown filesystem'}: no page cache bypass to observe")
    model = nn.Linear(2048, 1024)  # 8 MB of weights
    ckpt = Checkpointer(str(tmp_path / "run"), handle_signals=False)
    ckpt.track(model=model)
    ckpt.step()
    ckpt.save(wait=True)
    ckpt.close()
    info = CheckpointStore(str(tmp_path / "run")).latest()
    assert info is not None
    resident, pages = _resident_pages(tmp_path / "run" / info.name / "state.safetensors")
    # Only the header page and the unaligned tail went through the page cache.
    assert pages > 2000 and resident <= 4, f"{resident} of {pages} pages in the page cache"


def test_object_store_takes_the_ordinary_path(tmp_path: Path) -> None:
    url = f"memory://savegame-test/{tmp_path.name}"
    model = _model(0)
    ckpt = Checkpointer(url, handle_signals=False)
    ckpt.track(model=model)
    ckpt.step()
    ckpt.save(wait=True)
    ckpt.close()
    store = CheckpointStore(url)
    info = store.latest()
    assert info is not None and store.verify(info) == []
    fresh = _model(1)
    ckpt = Checkpointer(url, handle_signals=False)
    ckpt.track(model=fresh)
    assert ckpt.restore() is not None
    assert weights_sha256(fresh) == weights_sha256(model)
    ckpt.close()
