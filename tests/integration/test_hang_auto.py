"""Hang detection is on by default (`hang_timeout = "auto"`): a worker silent for longer than
max(hang_floor, 20 x the slowest step seen) is dumped, killed and restarted. The timeout follows the
steps as they come and is logged when it changes; an announced long evaluation (keepalive) is not a
step. The 30-minute floor is a unit test of the policy; here a small `hang_floor` stands in for it."""
import pytest

from helpers import Daemon, counter

pytestmark = pytest.mark.integration


def floor_config(tmp_path, floor: float):
    path = tmp_path / "hang.toml"
    path.write_text(f"hang_floor = {floor}\n")  # hang_timeout is left at its default: auto
    return ["--config", str(path)]


def test_a_hung_worker_is_caught_with_the_defaults(tmp_path):
    daemon = Daemon(tmp_path / "run", counter("--steps", 30, "--every", 5, "--sleep", 0.01, "--hang-at", 12),
                    floor_config(tmp_path, 1.5)).start()
    assert daemon.wait(timeout=90) == 0, daemon.stderr
    err = daemon.stderr
    assert "hang timeout: auto" in err and "no heartbeat for" in err
    assert "counter_worker.py" in err  # the stack dump
    assert "DONE 30" in daemon.stdout and daemon.status()["restarts"] == {"hang": 1}


def test_the_timeout_follows_the_slowest_step_and_a_slow_step_is_not_a_hang(tmp_path):
    """Steps of 0.3 s raise the timeout to at least 6 s (20 x 0.3); then one step of 3 s (longer than
    the 1 s floor, shorter than 6 s) passes, and raises it to at least 60 s."""
    daemon = Daemon(tmp_path / "run", counter("--steps", 24, "--every", 100, "--sleep", 0.3,
                                              "--pause-at", 20, "--pause-for", 3),
                    floor_config(tmp_path, 1)).start()
    assert daemon.wait(timeout=120) == 0, daemon.stderr
    err = daemon.stderr
    assert "no heartbeat" not in err and not daemon.status()["restarts"]
    changes = [line for line in err.splitlines() if "hang timeout now" in line]
    assert len(changes) >= 2, err
    assert daemon.status()["hang_timeout_s"] >= 20 * 3.0


def test_a_long_evaluation_in_keepalive_is_not_a_step(tmp_path):
    worker = ["-c", "import time, numpy as np, savegame\n"
                    "ckpt = savegame.Checkpointer(every_steps=1000)\nckpt.track(w=np.zeros(4))\nckpt.restore()\n"
                    "for epoch in ckpt.epochs(2):\n"
                    "    for _ in range(20):\n        time.sleep(0.01)\n        ckpt.step()\n"
                    "    with ckpt.keepalive('evaluating'):\n        time.sleep(2.5)\n"
                    "    ckpt.end_epoch()\nckpt.finish()\nprint('DONE', flush=True)\n"]
    daemon = Daemon(tmp_path / "run", worker, floor_config(tmp_path, 1)).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    assert "DONE" in daemon.stdout and "no heartbeat" not in daemon.stderr
    assert daemon.status()["hang_timeout_s"] < 20 * 2.5  # the evaluation did not count as a step


def test_hang_timeout_0_turns_detection_off(tmp_path):
    daemon = Daemon(tmp_path / "run", counter("--steps", 3), ["--hang-timeout", "0"]).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    assert "hang timeout: off" in daemon.stderr and daemon.status()["hang_timeout_s"] == 0


def test_a_slow_start_before_the_first_event_is_not_a_hang_under_auto(tmp_path):
    """A script that loads its data for longer than the floor before it creates its Checkpointer is
    not killed again and again: `auto` arms once the worker has said something (a number applies from
    the start, as it always did)."""
    worker = ["-c", "import time\ntime.sleep(2.5)\nimport numpy as np, savegame\n"
                    "ckpt = savegame.Checkpointer(every_steps=1000)\nckpt.track(w=np.zeros(4))\nckpt.restore()\n"
                    "ckpt.start_training()\nfor _ in range(5):\n    time.sleep(0.01)\n    ckpt.step()\n"
                    "ckpt.finish()\nprint('DONE', flush=True)\n"]
    daemon = Daemon(tmp_path / "run", worker, floor_config(tmp_path, 1)).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    assert "DONE" in daemon.stdout and "no heartbeat" not in daemon.stderr
