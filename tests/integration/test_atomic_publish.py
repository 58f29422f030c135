"""A commit is atomic for readers in other processes: while one process commits checkpoints as fast
as it can, another lists and verifies continuously. Every checkpoint it ever lists must verify, and
no half-published folder (damaged, or without its manifest) may ever show up. A publish that is
not one rename (say, a copy then a delete) fails this test."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration

COMMITS = 40

WRITER = r"""
import os, sys
from savegame.storage import CheckpointStore

store = CheckpointStore(sys.argv[1])
shard = os.urandom(256 << 10)
for step in range(1, int(sys.argv[2]) + 1):
    with store.begin(step) as staged:
        for i in range(8):  # several files: names on both sides of manifest.json in a directory's order
            staged.write_bytes(f"{chr(97 + i * 3)}-shard{i}.bin", shard)
        staged.write_bytes("model.bin", os.urandom(1 << 20))
        staged.commit(epoch=step)
print("done", flush=True)
"""

READER = r"""
import json, os, sys
from savegame.storage import CheckpointStore

store, stop = CheckpointStore(sys.argv[1]), sys.argv[2]
seen, problems, passes = set(), [], 0
while True:
    last = os.path.exists(stop)  # one more full pass after the writer is done
    scan = store.scan()
    for bad in scan.damaged + scan.incomplete:
        problems.append(f"step {bad.step} listed as {bad.problem}")
    for info in scan.committed:
        for problem in store.verify(info):
            problems.append(f"step {info.step} listed, yet {problem}")
        seen.add(info.step)
    passes += 1
    if last or len(problems) > 20:
        break
print(json.dumps({"seen": sorted(seen), "problems": problems[:20], "passes": passes}), flush=True)
"""


def test_readers_never_see_a_half_published_checkpoint(tmp_path: Path, savegame_env):
    root = tmp_path / "run"
    CheckpointStore(str(root)).begin(0).abort()  # the run folder exists before the reader starts
    stop = tmp_path / "writer-done"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(root), str(stop)], env=savegame_env,
                              stdout=subprocess.PIPE, text=True)
    try:
        writer = subprocess.run([sys.executable, "-c", WRITER, str(root), str(COMMITS)], env=savegame_env,
                                capture_output=True, text=True, timeout=300)
        assert writer.returncode == 0, writer.stderr[-3000:]
        stop.write_text("")
        out, _ = reader.communicate(timeout=300)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    result = json.loads(out)
    assert result["problems"] == [], result["problems"]
    assert result["seen"] == list(range(1, COMMITS + 1)) and result["passes"] >= 5, result
