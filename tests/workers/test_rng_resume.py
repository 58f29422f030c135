"""Python's and NumPy's global random generators continue after a resume exactly as in an
uninterrupted run: a checkpoint really saved to a folder, the resume in a fresh process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from worker_helpers import run

pytestmark = pytest.mark.integration

SCRIPT = """
import json, random, sys
import numpy as np
import savegame

run_dir, stop_after = sys.argv[1], int(sys.argv[2])
random.seed(7)
np.random.seed(7)
w = np.zeros(3)
ckpt = savegame.Checkpointer(run_dir, handle_signals=False, every_steps=1000)
ckpt.track(w=w)
ckpt.restore()
draws = []
while ckpt.progress.step < 6:
    # random.gauss and the legacy normal keep a second value cached: part of the state too
    draws.append([random.random(), random.gauss(0, 1), float(np.random.random()),
                  float(np.random.standard_normal())])
    w += 1
    ckpt.step()
    if ckpt.progress.step == stop_after and ckpt.resumed_from is None:
        ckpt.save(wait=True)
        break
else:
    ckpt.finish()
ckpt.close()
print(json.dumps(draws))
"""


def draws(run_dir: Path, stop_after: int) -> list[list[float]]:
    done = run(SCRIPT, run_dir, stop_after)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("stop_after", [1, 3])
def test_python_and_numpy_random_continue_exactly_after_a_resume(tmp_path: Path, stop_after: int) -> None:
    straight = draws(tmp_path / "straight", 0)
    first = draws(tmp_path / "interrupted", stop_after)
    resumed = draws(tmp_path / "interrupted", stop_after)
    assert len(straight) == 6 and len(first) == stop_after
    assert first + resumed == straight
