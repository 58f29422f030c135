"""The Checkpointer handles signals only while training: a script that only loads weights (an
inference server) keeps its own SIGTERM behaviour, and the handlers go back at finish().
Under a daemon, the training process announces itself (hello) at its first training call."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from worker_helpers import EventSocket, read_line, run, start, worker_env

pytestmark = pytest.mark.integration

TRAIN = """
import sys, numpy as np, savegame
w = np.zeros(4)
ckpt = savegame.Checkpointer(sys.argv[1])
ckpt.track(w=w)
ckpt.restore()
for _ in range(3):
    w += 1
    ckpt.step()
ckpt.finish()
"""

LOAD_ONLY = """
import sys, time, numpy as np, savegame
w = np.zeros(4)
ckpt = savegame.Checkpointer(sys.argv[1])
ckpt.track(w=w)
ckpt.restore()
print("serving with weights", w[0], flush=True)
time.sleep(20)
print("still serving", flush=True)
"""

LIFETIME = """
import json, signal, sys, numpy as np, savegame
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
def mine(signum, frame):
    pass
for s in SIGNALS:
    signal.signal(s, mine)
def handlers():
    return {signal.Signals(s).name: "mine" if signal.getsignal(s) is mine else "other" for s in SIGNALS}
seen = {}
ckpt = savegame.Checkpointer(sys.argv[1], handle_signals=sys.argv[2] == "on")
ckpt.track(w=np.zeros(2))
ckpt.restore()
seen["loaded"] = handlers()
for epoch in ckpt.epochs(1):
    seen["training"] = handlers()
    ckpt.step()
ckpt.finish()
seen["finished"] = handlers()
print(json.dumps(seen))
"""


def test_a_script_that_only_loads_weights_keeps_the_default_sigterm(tmp_path: Path) -> None:
    """An inference server built on restore() must still die on SIGTERM, at once (it used to
    record the request and keep serving until its own end)."""
    run_dir = tmp_path / "run"
    assert run(TRAIN, run_dir).returncode == 0
    events = EventSocket(tmp_path / "ev.sock")  # under a daemon as well: it must not say hello
    env = worker_env(SAVEGAME_DIR=str(run_dir), SAVEGAME_EVENTS=events.path,
                     SAVEGAME_RESUME_FROM=str(run_dir / "ckpt-000000000003"))
    proc = start(LOAD_ONLY, run_dir, env=env)
    try:
        assert read_line(proc, "serving") == "serving with weights 3.0"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait()
    assert events.drain() and "hello" not in events.kinds(), events.kinds()
    events.close()


@pytest.mark.parametrize("handle", ["on", "off"])
def test_handlers_are_installed_while_training_and_given_back_at_finish(tmp_path: Path, handle: str) -> None:
    done = run(LIFETIME, tmp_path / "run", handle)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    mine = {"SIGTERM": "mine", "SIGINT": "mine", "SIGUSR1": "mine"}
    assert seen["loaded"] == mine, "loading a checkpoint must not take the signals over"
    assert seen["training"] == (mine if handle == "off" else {name: "other" for name in mine})
    assert seen["finished"] == mine, "finish() must give the script's own handlers back"


def test_the_training_process_says_hello_at_its_first_training_call(tmp_path: Path) -> None:
    events = EventSocket(tmp_path / "ev.sock")
    env = worker_env(SAVEGAME_DIR=str(tmp_path / "run"), SAVEGAME_EVENTS=events.path, SAVEGAME_RESUME_FROM="")
    proc = start(TRAIN, tmp_path / "run", env=env)
    events.wait_for("finished")
    assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    events.drain()
    kinds = events.kinds()
    assert kinds.count("hello") == 1, kinds
    assert kinds.index("started") < kinds.index("hello") < kinds.index("heartbeat") < kinds.index("committed")
    hello = events.events[kinds.index("hello")]
    assert hello == {"event": "hello", "pid": proc.pid, "handles": ["SIGTERM", "SIGUSR1", "SIGINT"],
                     "rank": 0, "world_size": 1}
    events.close()


def test_a_worker_that_ignores_sigterm_does_not_claim_to_handle_it(tmp_path: Path) -> None:
    """What the process was told to ignore stays ignored (nohup, a background job's SIGINT, a
    script's own SIG_IGN), and hello says so: the daemon then knows SIGTERM will not be answered."""
    events = EventSocket(tmp_path / "ev.sock")
    env = worker_env(SAVEGAME_DIR=str(tmp_path / "run"), SAVEGAME_EVENTS=events.path, SAVEGAME_RESUME_FROM="")
    script = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + TRAIN + \
             "assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN\n"
    done = run(script, tmp_path / "run", env=env)
    assert done.returncode == 0, done.stderr
    hello = events.wait_for("hello", timeout=1)
    assert hello["handles"] == ["SIGUSR1", "SIGINT"]
    events.close()


def test_sigterm_during_training_still_saves_and_exits_75(tmp_path: Path) -> None:
    script = """
import sys, time, numpy as np, savegame
w = np.zeros(4)
ckpt = savegame.Checkpointer(sys.argv[1])
ckpt.track(w=w)
ckpt.restore()
while True:
    w += 1
    ckpt.step()
    if ckpt.progress.step == 2:
        print("training", flush=True)
    time.sleep(0.01)
"""
    proc = start(script, tmp_path / "run")
    read_line(proc, "training")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 75, proc.stderr.read() if proc.stderr else ""
    assert time.monotonic() - started < 5
    assert any((tmp_path / "run").glob("ckpt-*/manifest.json"))
