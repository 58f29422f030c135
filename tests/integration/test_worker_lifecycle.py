"""The worker outlives what the daemon outlives: a dropped terminal, wrappers, a killed daemon."""
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest

from helpers import COUNTER_WORKER, SAVEGAME, Daemon, clean_env, committed_steps, counter, wait_until

pytestmark = pytest.mark.integration


def manifest(run, step):
    return json.loads((run / f"ckpt-{step:012d}" / "manifest.json").read_text())


def read_status(run):
    try:
        return json.loads((run / ".savegame" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def test_a_dropped_terminal_still_gets_its_emergency_checkpoint(tmp_path):
    """SSH drops: the daemon's terminal hangs up (SIGHUP, then EIO on every write). The worker, which
    prints at every step, used to die of EIO before saving; its output now goes to a file."""
    run = tmp_path / "run"
    master, slave = os.openpty()

    def controlling_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    daemon = subprocess.Popen([SAVEGAME, "run", "--dir", str(run), "--", sys.executable, COUNTER_WORKER,
                               "--steps", "100000", "--sleep", "0.01", "--every", "100000", "--print"],
                              stdin=slave, stdout=slave, stderr=slave, env=clean_env(), start_new_session=True,
                              preexec_fn=controlling_terminal)
    os.close(slave)
    seen = bytearray()

    def drain():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        wait_until(lambda: b"step 50" in seen, timeout=30)  # the worker's lines reach the terminal
        os.close(master)  # the terminal goes away: SIGHUP to the daemon, EIO for whoever writes to it
        assert daemon.wait(timeout=60) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
    status = read_status(run)
    assert status["state"] == "stopped" and "emergency checkpoint committed" in status["reason"], status
    assert manifest(run, committed_steps(run)[-1])["reason"] == "emergency"
    assert b"step 50" in (run / ".savegame" / "worker.out").read_bytes()  # and the output was kept


def test_a_wrapped_worker_is_heard_signalled_and_saved(tmp_path):
    """`savegame run -- sh -c "cd x && python train.py; echo done"`: events come from python, a grandchild;
    the stop goes to the process that announced itself, not to sh; the emergency checkpoint is made
    (and told apart from a plain exit, since sh exits 0)."""
    run = tmp_path / "run"
    inner = f"{sys.executable} {COUNTER_WORKER} --steps 100000 --sleep 0.01 --every 100000"
    daemon = Daemon(run, [], ["--hang-timeout", "2"])
    daemon.cmd = daemon.cmd[:-1] + ["sh", "-c", f"cd {tmp_path} && {inner}; echo wrapper-done"]
    daemon.start()
    try:
        wait_until(lambda: (daemon.status() or {}).get("worker_ready"), timeout=30)
        time.sleep(3)  # longer than --hang-timeout: the grandchild's heartbeats count
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    finally:
        daemon.kill()
    assert "no heartbeat" not in daemon.stderr
    assert "emergency checkpoint committed" in daemon.stderr
    assert manifest(run, committed_steps(run)[-1])["reason"] == "emergency"
    assert "wrapper-done" in daemon.stdout


def test_sigusr1_goes_only_to_a_worker_that_takes_it(tmp_path):
    """A plain script (no savegame) would be killed by SIGUSR1: the daemon does not send it."""
    run = tmp_path / "run"
    daemon = Daemon(run, ["-c", "import time; print('plain', flush=True); time.sleep(4)"]).start()
    try:
        wait_until(lambda: "plain" in daemon.stdout, timeout=30)
        daemon.signal(signal.SIGUSR1)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    finally:
        daemon.kill()
    assert "checkpoint request not sent" in daemon.stderr and "restarts" not in daemon.stderr.lower()
    assert read_status(run)["state"] == "succeeded"


def step_log(path):
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_kill_9_of_the_daemon_leaves_no_orphan_writing_and_no_step_twice(tmp_path):
    """The OOM killer takes the daemon: its worker learns of it, commits an emergency checkpoint and
    exits; a new daemon waits for that, then resumes; across both, every step runs exactly once."""
    run, log = tmp_path / "run", tmp_path / "steps.log"
    worker = counter("--steps", 400, "--sleep", 0.01, "--every", 50, "--log", log)
    first = Daemon(run, worker, ["--grace", "10"]).start()
    wait_until(lambda: (first.status() or {}).get("worker_ready"), timeout=30)
    orphan = first.status()["worker_pid"]
    wait_until(lambda: len(step_log(log)) > 60, timeout=30)
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait()
    second = Daemon(run, worker, ["--grace", "10"]).start()
    try:
        assert second.wait(timeout=120) == 0, second.stderr[-3000:]
    finally:
        second.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(orphan, 0)
    assert "DONE 400" in second.stdout
    assert step_log(log) == list(range(400)), "a step ran twice or was skipped"
    reasons = [manifest(run, s)["reason"] for s in committed_steps(run)]
    assert "emergency" in reasons


def test_a_removed_event_socket_is_bound_again_without_a_restart(tmp_path):
    """A cleaner of old files removes the daemon's event socket: the daemon binds it again at the same
    address, the running worker is heard again, and nobody is restarted or stopped."""
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 100000)).start()
    try:
        pid = daemon.ready()
        socket_path = run / ".savegame" / "events.sock"
        socket_path.unlink()
        wait_until(lambda: "binding it again" in daemon.stderr, timeout=30)
        seen = (daemon.status() or {}).get("heartbeat", {}).get("time")
        wait_until(lambda: ((daemon.status() or {}).get("heartbeat") or {}).get("time", 0) > (seen or 0), timeout=30)
        assert daemon.status()["worker_pid"] == pid and not daemon.status()["restarts"]
        assert socket_path.exists()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    finally:
        daemon.kill()
    assert "the daemon is gone" not in daemon.stdout + daemon.stderr
