"""Found by an adversarial review (it failed before its fix) (issue 8 item 11: "never hide a verified checkpoint for an environmental
failure", which names "a --hang-timeout hit during a long evaluation"). A script that evaluates the
restored model before training on (no keepalive) is killed as hung right after loading, every time.
Hangs are booked against the checkpoint like crashes: the newest verified checkpoint is set aside,
the run falls back to an older one (going back in time), then gives up."""
from __future__ import annotations

import sys
import textwrap

import pytest

from helpers import savegame

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import time
    import numpy as np
    import savegame
    w = np.zeros(1000, dtype=np.float32)
    ckpt = savegame.Checkpointer(every_steps=5)
    ckpt.track(w=w)
    if ckpt.restore() is not None:
        time.sleep(4)  # a long evaluation of the restored model, before any step
    for _ in ckpt.epochs(1):
        while ckpt.progress.step < 30:
            w += 1
            time.sleep(0.02)
            ckpt.step()
    ckpt.finish()
""")


def test_a_hang_timeout_during_an_evaluation_after_loading_never_sets_the_checkpoint_aside(tmp_path):
    script, run = tmp_path / "train.py", tmp_path / "run"
    script.write_text(SCRIPT)
    first = savegame("run", "--dir", str(run), "--", sys.executable, str(script))
    assert first.returncode == 0, first.stderr
    fast = tmp_path / "fast.toml"
    fast.write_text("backoff_initial = 0.1\nbackoff_max = 0.2\n")
    again = savegame("run", "--config", str(fast), "--dir", str(run), "--hang-timeout", "1.5", "--max-restarts", "4",
                     "--", sys.executable, str(script), timeout=120)
    assert "setting step 30 aside" not in again.stderr and "falling back" not in again.stderr, again.stderr[-2500:]
