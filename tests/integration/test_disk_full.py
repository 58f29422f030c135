"""A save into a full target fails with a clear StorageError; earlier checkpoints stay intact and
the staging is removed.

Two ways to fill a disk for real: RLIMIT_FSIZE in a subprocess (write() returns EFBIG once the
file reaches the limit, with SIGXFSZ ignored), and, where this test runs as root, a small tmpfs
(ENOSPC).
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from savegame.errors import StorageError
from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration

LIMIT = 1 << 20

CHILD = r"""
import json, resource, signal, sys
from savegame.errors import StorageError
from savegame.storage import CheckpointStore

root, limit, sizes = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so write() fails with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
store = CheckpointStore(root)
for step in (1, 2):
    with store.begin(step) as staged:
        staged.write_bytes("model.bin", bytes([step]) * (limit // 2))
        staged.commit(epoch=step)
try:
    with store.begin(3) as staged:
        for i, size in enumerate(sizes):
            with staged.open(f"part{i}.bin") as f:
                for start in range(0, size, 256 << 10):
                    f.write(b"z" * min(256 << 10, size - start))
        staged.commit(epoch=3)
    print(json.dumps({"saved": True}))
except StorageError as exc:
    print(json.dumps({"type": type(exc).__name__, "errno": exc.errno, "message": exc.strerror or str(exc),
                      "oserror": isinstance(exc, OSError)}))
"""


def assert_intact(root: Path, steps: list[int]) -> None:
    store = CheckpointStore(str(root))
    assert [c.step for c in store.list()] == steps
    assert all(store.verify(c) == [] for c in store.list())
    assert not list((root / ".staging").iterdir()), "the failed save left its staging behind"
    assert not (root / "ckpt-000000000003").exists()
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("ckpt-")) == \
        [f"ckpt-{s:012d}" for s in steps]


@pytest.mark.parametrize("sizes, failing", [
    ([3 * LIMIT], "part0.bin"),  # the first file outgrows the limit
    ([LIMIT // 4, LIMIT // 4, 2 * LIMIT], "part2.bin"),  # two files fit, the third does not
])
def test_save_beyond_the_file_size_limit(tmp_path: Path, savegame_env: dict, sizes: list[int], failing: str):
    root = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(root), str(LIMIT), json.dumps(sizes)],
                          env=savegame_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.get("type") == "StorageError" and result["oserror"], result
    assert result["errno"] == errno.EFBIG
    message = result["message"]
    assert str(root) in message and failing in message
    assert "no space left" in message and "free disk space or keep fewer checkpoints" in message
    assert_intact(root, [1, 2])


@pytest.fixture
def small_tmpfs(tmp_path: Path):
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_save_into_a_full_tmpfs(small_tmpfs: Path):
    root = small_tmpfs / "run"
    store = CheckpointStore(str(root))
    for step in (1, 2):
        with store.begin(step) as staged:
            staged.write_bytes("model.bin", bytes([step]) * (1 << 20))
            staged.commit(epoch=step)
    with pytest.raises(StorageError) as info:
        with store.begin(3) as staged:
            with staged.open("model.bin") as f:
                for _ in range(8):
                    f.write(b"z" * (1 << 20))
            staged.commit(epoch=3)
    assert info.value.errno == errno.ENOSPC
    assert "no space left" in info.value.strerror and "model.bin" in info.value.strerror
    assert_intact(root, [1, 2])
    # the failed save gave its space back: a save that fits works again
    with store.begin(3) as staged:
        staged.write_bytes("model.bin", b"small" * 1000)
        staged.commit(epoch=3)
    assert [c.step for c in store.list()] == [1, 2, 3] and store.verify(store.get(3)) == []
