"""Back-pressure: saving every step, faster than the disk can write, never piles up copies of the state.

A ~200 MB model is saved at every step of a loop whose steps take a fraction of a save's write
time. The training thread must wait for the save in flight instead of queueing more, so the
process's peak resident memory grows by one host copy of the state (the reusable buffer), not one
per pending save. Measured in a separate process by VmHWM, its own peak (ru_maxrss would carry the
pytest parent's peak across exec).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.frameworks

SCRIPT = r'''
import json, os, sys, time
import torch
from savegame import Checkpointer
from savegame.storage import CheckpointStore

run_dir, steps = sys.argv[1], int(sys.argv[2])
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
# This process's own peak. Not ru_maxrss: it survives execve, so a child of a big pytest process
# would report the parent's peak (the kernel keeps the old address space's high-water mark).
hwm = lambda: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
model = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(12_500_000)) for _ in range(4)])  # 200 MB
state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
ckpt = Checkpointer(run_dir, every_steps=1, keep_last=2, handle_signals=False)
ckpt.track(model=model)
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)  # every page resident before the baseline
base, peak_sampled = rss(), 0
started = time.monotonic()
stalls, busy = [], 0
for _ in range(steps):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # a "step" much shorter than writing 200 MB
    inflight = ckpt._writer._inflight
    busy += inflight is not None and not inflight.done()  # the last save is still being written
    t = time.monotonic()
    ckpt.step()  # saves every step: waits for the previous save, copies, returns
    stalls.append(time.monotonic() - t)
    peak_sampled = max(peak_sampled, rss())
ckpt.finish()
elapsed = time.monotonic() - started
listed = CheckpointStore(run_dir).list()
print(json.dumps({"base": base, "peak_sampled": peak_sampled, "state_bytes": state_bytes,
                  "maxrss": hwm(),
                  "steps": [c.step for c in listed], "elapsed": elapsed, "stalls": stalls, "busy": busy,
                  "value": float(model[0][0].detach())}))
'''


def test_saving_every_step_faster_than_the_disk_keeps_one_extra_copy(tmp_path: Path) -> None:
    steps = 6
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), str(steps)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    state = r["state_bytes"]
    growth = r["maxrss"] - r["base"]
    # Every step was saved (each save waited for the one before it), retention kept the last two.
    assert r["steps"] == [steps - 1, steps], r["steps"]
    assert r["value"] == steps + 1.0
    # Saves really came faster than the disk wrote them: most found the previous one still in flight.
    assert r["busy"] >= steps // 2, r
    # One host copy of the state, plus a little (allocator slack, JSON, thread stacks), never two.
    assert growth <= 1.25 * state, f"peak RSS grew by {growth / 1e6:.0f} MB for a {state / 1e6:.0f} MB state"
    assert growth >= 0.75 * state, f"expected the one host buffer to show ({growth / 1e6:.0f} MB): bad measurement?"
