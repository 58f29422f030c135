"""Heartbeats outside the step loop: ckpt.heartbeat() and `with ckpt.keepalive("evaluating"):`,
so a long evaluation is not taken for a hang; without a daemon both do nothing."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import Daemon
from savegame import Checkpointer
from worker_helpers import EventSocket

pytestmark = pytest.mark.integration


@pytest.fixture
def supervised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key in ("SAVEGAME_CONFIG", "SAVEGAME_PROGRESS"):
        monkeypatch.delenv(key, raising=False)
    events = EventSocket(tmp_path / "ev.sock")
    monkeypatch.setenv("SAVEGAME_EVENTS", events.path)
    monkeypatch.setenv("SAVEGAME_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("SAVEGAME_RESUME_FROM", "")
    ckpt = Checkpointer(handle_signals=False)
    ckpt.track(w=np.zeros(4))
    ckpt.restore()
    ckpt.step()
    events.drain()
    yield ckpt, events
    ckpt.close()
    events.close()


def keepalive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "savegame-keepalive"]


def test_keepalive_sends_heartbeats_while_the_block_runs(supervised) -> None:
    ckpt, events = supervised
    before = len(events.events)
    with ckpt.keepalive("evaluating"):
        time.sleep(1.6)  # no step boundary in here
        assert len(keepalive_threads()) == 1
    beats = [e for e in events.drain(0.1)[before:] if e["event"] == "heartbeat"]
    assert len(beats) >= 3, beats
    assert all(b["activity"] == "evaluating" and b["step"] == 1 for b in beats)
    assert keepalive_threads() == []
    after = len(events.events)
    time.sleep(1.2)
    assert events.drain(0.1)[after:] == [], "heartbeats went on after the block ended"


def test_keepalive_ends_its_thread_when_the_block_raises(supervised) -> None:
    ckpt, _ = supervised
    with pytest.raises(ZeroDivisionError):
        with ckpt.keepalive("evaluating"):
            1 / 0
    assert keepalive_threads() == []


def test_heartbeat_now_is_rate_limited(supervised) -> None:
    ckpt, events = supervised
    time.sleep(0.6)
    before = len(events.events)
    assert ckpt.heartbeat() is True
    assert ckpt.heartbeat() is False  # too soon after the last one
    assert [e["event"] for e in events.drain(0.2)[before:]] == ["heartbeat"]


def test_without_a_daemon_they_do_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SAVEGAME_EVENTS", "SAVEGAME_DIR", "SAVEGAME_RESUME_FROM", "SAVEGAME_CONFIG", "SAVEGAME_PROGRESS"):
        monkeypatch.delenv(key, raising=False)
    ckpt = Checkpointer(str(tmp_path / "run"), handle_signals=False)
    ckpt.track(w=np.zeros(4))
    assert ckpt.heartbeat() is False
    with ckpt.keepalive("evaluating"):
        assert keepalive_threads() == []
    ckpt.close()


EVALUATES_LONG = """
import time, numpy as np, savegame
ckpt = savegame.Checkpointer(every_steps=1000)
ckpt.track(w=np.zeros(4))
ckpt.restore()
for epoch in ckpt.epochs(2):
    for _ in range(3):
        ckpt.step()
    with ckpt.keepalive("evaluating"):
        time.sleep(2.5)  # longer than --hang-timeout
    ckpt.end_epoch()
ckpt.finish()
print("DONE", flush=True)
"""


def test_a_long_evaluation_in_keepalive_is_not_a_hang(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "run", ["-c", EVALUATES_LONG], ["--hang-timeout", "1"]).start()
    try:
        assert daemon.wait(timeout=60) == 0, daemon.stderr
    finally:
        daemon.kill()
    assert "DONE" in daemon.stdout
    assert "no heartbeat" not in daemon.stderr
    assert not daemon.status().get("restarts")
