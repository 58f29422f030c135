"""Review reproductions (issue 8 B and E16: exit codes tell the truth). README, exit codes: 74 when
"the emergency checkpoint could not be committed". A stop whose worker never commits it (it ignores
SIGTERM, or is too slow for the grace period, and is SIGKILLed) ends with exit 0 and status "stopped",
exactly like a clean emergency stop; systemd, a wrapper script or an operator cannot tell that work
since the last periodic checkpoint was lost."""
from __future__ import annotations

import signal

import pytest

from helpers import Daemon, counter

pytestmark = pytest.mark.integration


def test_a_stop_whose_emergency_checkpoint_was_never_committed_is_not_exit_0(tmp_path):
    d = Daemon(tmp_path / "run", counter("--steps", 100000, "--every", 50, "--sleep", 0.01, "--ignore-term"),
               ["--grace", "2"]).start()
    try:
        d.ready()
        d.signal(signal.SIGTERM)
        code = d.wait(timeout=60)
    finally:
        d.kill()
    assert "no emergency checkpoint" in d.stderr
    assert code != 0, "exit 0 after a stop that lost the work since the last periodic checkpoint"
