"""The unit tier stays fast: selecting it (`pytest -m unit`) imports no framework while collecting."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COLLECT = """
import sys, pytest
code = pytest.main(["-m", sys.argv[1], "--collect-only", "-q", "-p", "no:cacheprovider", "tests"])
print("IMPORTED", sorted(m for m in ("torch", "tensorflow", "keras") if m in sys.modules))
sys.exit(code)
"""


def collect(markers: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SAVEGAME_")}
    done = subprocess.run([sys.executable, "-c", COLLECT, markers], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stdout


def test_collecting_the_unit_tier_imports_no_framework() -> None:
    code, out = collect("unit")
    assert code == 0, out[-2000:]
    assert "IMPORTED []" in out, out[-2000:]
    assert "tests/unit/" in out


def test_the_frameworks_tier_is_still_collected_when_selected() -> None:
    code, out = collect("frameworks and not chaos")
    assert code == 0, out[-2000:]
    assert "tests/frameworks/test_torch_refuse.py::" in out and "tests/frameworks/test_keras_callback.py::" in out
    assert "test_sigkills_and_daemon_sigterm" not in out  # deselected by "not chaos", as usual
