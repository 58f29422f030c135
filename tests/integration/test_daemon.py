"""`savegame run` with real worker processes and real signals."""
import json
import os
import random
import signal
import time

import pytest

from helpers import Daemon, committed_steps, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def step_log(path):
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def test_run_to_the_end_keeps_what_the_policy_says(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 40, "--every", 5), ["--keep-last", "3"]).start()
    assert daemon.wait() == 0, daemon.stderr
    assert "DONE 40" in daemon.stdout
    assert committed_steps(run) == [30, 35, 40]
    status = json.loads(savegame("status", str(run), "--json").stdout)
    assert status["state"] == "succeeded" and status["last_checkpoint"]["step"] == 40


@pytest.mark.parametrize("seed", range(6))
def test_sigterm_at_a_random_moment_commits_an_emergency_checkpoint(tmp_path, seed):
    """Mid-step or mid-save (the worker has announced itself, so its handler is in place): exit 0 before
    the deadline with the last step in an emergency checkpoint, and the next run resumes from it;
    across both runs every step runs exactly once. Asserted on every seed."""
    rng = random.Random(seed)
    run, log = tmp_path / "run", tmp_path / "steps.log"
    worker = counter("--steps", 400, "--sleep", 0.004, "--size-mb", 8, "--every", 7, "--log", log)
    daemon = Daemon(run, worker, ["--grace", "10"]).start()
    daemon.ready()
    time.sleep(rng.uniform(0.0, 0.4))
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0, daemon.stderr
    assert time.monotonic() - started < 10
    done_before = step_log(log)
    assert committed_steps(run)[-1] == len(done_before), "the emergency checkpoint holds the last step"
    assert "emergency checkpoint committed" in daemon.stderr
    second = Daemon(run, worker).start()
    assert second.wait() == 0, second.stderr
    assert "DONE 400" in second.stdout
    assert step_log(log) == list(range(400)), "a step ran twice or was skipped"


def test_sigterm_before_the_worker_is_ready_stops_cleanly(tmp_path):
    """During start-up (the daemon is up, its worker not yet): a clean stop, and the run resumes later."""
    run, log = tmp_path / "run", tmp_path / "steps.log"
    worker = counter("--steps", 30, "--sleep", 0.004, "--every", 7, "--log", log)
    daemon = Daemon(run, worker).start()
    wait_until(daemon.status)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=15) == 0, daemon.stderr
    assert daemon.status()["state"] == "stopped"
    second = Daemon(run, worker).start()
    assert second.wait() == 0, second.stderr
    assert step_log(log) == list(range(30))


def test_worker_that_ignores_sigterm_is_killed_at_the_deadline(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--ignore-term"), ["--grace", "1"]).start()
    pid = daemon.ready()
    wait_until(lambda: committed_steps(run))  # a periodic checkpoint exists
    started = time.monotonic()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 74  # stopped in time, but the work since the last checkpoint is lost
    assert 0.9 < time.monotonic() - started < 5
    with pytest.raises(ProcessLookupError):
        import os
        os.kill(pid, 0)
    assert "grace period (1s) ran out" in daemon.stderr
    assert daemon.status()["state"] == "stopped"


def test_crash_loop_backs_off_and_gives_up_with_exit_1(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, ["-c", "import sys, time; time.sleep(0.05); sys.exit(3)"], ["--max-restarts", "2"]).start()
    assert daemon.wait(timeout=30) == 1
    assert "giving up" in daemon.stderr and "the budget is 2" in daemon.stderr
    assert "restart in 1s" in daemon.stderr  # backed off before the last attempt
    assert daemon.status()["restarts"] == {"crash": 2}


def fast_backoff(tmp_path, extra=""):
    config = tmp_path / "fast.toml"
    config.write_text(f"backoff_initial = 0.1\nbackoff_max = 0.2\n{extra}")
    return ["--config", str(config)]


def test_a_crash_after_progress_never_hides_the_verified_checkpoint(tmp_path):
    """A crash at step 12, after resuming from step 10 and making progress, is not about step 10:
    it is restarted within the budget, then the run gives up; step 10 is never quarantined."""
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 50, "--every", 5, "--sleep", 0.01, "--crash-at", 12),
                    ["--max-restarts", "3", *fast_backoff(tmp_path)]).start()
    assert daemon.wait(timeout=60) == 1
    err = daemon.stderr
    assert "giving up" in err and "the budget is 3" in err
    assert "falling back" not in err and "quarantined" not in err and "aside" not in err
    assert 10 in committed_steps(run) and not (run / ".quarantine").exists()
    assert err.count("resuming from step 10") == 3


def test_deaths_right_after_loading_fall_back_once_then_give_up(tmp_path):
    run = tmp_path / "run"
    worker = counter("--steps", 50, "--every", 5, "--sleep", 0.01, "--crash-at", 12, "--crash-after-load", 10)
    daemon = Daemon(run, worker, ["--max-restarts", "10", *fast_backoff(tmp_path)]).start()
    assert daemon.wait(timeout=60) == 1
    err = daemon.stderr
    assert "died 3 times right after loading step 10: falling back one checkpoint" in err
    assert "setting step 10 aside for this run" in err
    assert "resuming from step 5" in err.split("setting step 10 aside")[1]
    assert "giving up" in err
    assert not (run / ".quarantine").exists()  # verified: kept where it is
    assert 10 in committed_steps(run) and savegame("verify", str(run)).returncode == 0


def test_hanging_worker_is_dumped_killed_and_restarted(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 30, "--every", 5, "--sleep", 0.01, "--hang-at", 12),
                    ["--hang-timeout", "1.5"]).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    err = daemon.stderr
    assert "no heartbeat for" in err
    assert "counter_worker.py" in err and "line" in err  # the faulthandler stack dump
    assert "DONE 30" in daemon.stdout
    assert daemon.status()["restarts"] == {"hang": 1}


def test_sigusr1_to_the_daemon_takes_a_checkpoint_now(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 1000000)).start()
    daemon.ready()
    daemon.signal(signal.SIGUSR1)
    wait_until(lambda: committed_steps(run), timeout=10)
    manifest = json.loads((run / f"ckpt-{committed_steps(run)[0]:012d}" / "manifest.json").read_text())
    assert manifest["reason"] == "manual"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=10) == 0


@pytest.mark.parametrize("toml, message", [
    ("kep = 3\n", "unknown key 'kep' (did you mean 'keep'?)"),
    ("[keep]\nlast = -1\n", "keep.last = -1: must be an integer >= 0"),
    ("grace = 'soon'\n", "grace = 'soon': must be a duration"),
    ("not toml [", "not valid TOML"),
])
def test_bad_config_exits_78_with_a_message(tmp_path, toml, message):
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = savegame("run", "--config", str(config), "--dir", str(tmp_path / "run"), "--", "true")
    assert result.returncode == 78
    assert message in result.stderr and "Traceback" not in result.stderr


def test_unknown_command_exits_78_and_is_not_retried(tmp_path):
    result = savegame("run", "--dir", str(tmp_path / "run"), "--", "no-such-trainer-xyz")
    assert result.returncode == 78
    assert "command not found: 'no-such-trainer-xyz'" in result.stderr
    assert result.stderr.count("worker started") == 0


def test_missing_command_is_a_usage_error(tmp_path):
    result = savegame("run", "--dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "no command" in result.stderr


def test_status_shows_a_running_daemon(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 20)).start()
    try:
        pid = daemon.worker_pid()
        wait_until(lambda: (daemon.status() or {}).get("last_checkpoint"), timeout=10)
        text = savegame("status", str(run)).stdout
        assert "state:           running" in text and f"pid {pid}" in text
        assert "last checkpoint: step" in text and "steps/s" in text
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
    assert "state:           stopped" in savegame("status", str(run)).stdout


def test_a_preemption_notice_stops_the_run_with_an_emergency_checkpoint(tmp_path):
    """A metadata server (a real HTTP server on loopback) announces the preemption: the daemon
    stops the worker with an emergency checkpoint before any SIGTERM arrives."""
    import http.server
    import threading

    class Metadata(http.server.BaseHTTPRequestHandler):
        preempted = False

        def do_GET(self):  # noqa: N802
            body = b"TRUE" if Metadata.preempted else b"FALSE"
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = tmp_path / "savegame.toml"
    config.write_text(f'preemption = "http://127.0.0.1:{server.server_port}/preempted"\npreemption_interval = 0.5\n'
                      "[keep]\nlast = 100\n")
    run = tmp_path / "run"
    try:
        daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 1000),
                        ["--config", str(config)]).start()
        daemon.worker_pid()
        time.sleep(1.2)
        assert daemon.proc.poll() is None  # "FALSE": no notice yet
        Metadata.preempted = True
        assert daemon.wait(timeout=15) == 0, daemon.stderr
    finally:
        server.shutdown()
    assert "preemption notice (url): asking the worker for an emergency checkpoint" in daemon.stderr
    manifest = json.loads((run / f"ckpt-{committed_steps(run)[-1]:012d}" / "manifest.json").read_text())
    assert manifest["reason"] == "emergency"


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGHUP"])
def test_sigint_and_sighup_stop_like_sigterm(tmp_path, signal_name):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 1000)).start()
    daemon.ready()
    daemon.signal(getattr(signal, signal_name))
    assert daemon.wait(timeout=15) == 0, daemon.stderr
    assert f"{signal_name}: asking the worker for an emergency checkpoint" in daemon.stderr
    assert committed_steps(run)


def test_a_second_sigterm_does_not_cut_the_emergency_save_short(tmp_path):
    run = tmp_path / "run"
    # 128 MB of state: the emergency save takes a while, and a second SIGTERM lands inside it.
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--size-mb", 128, "--every", 10**6)).start()
    daemon.ready()
    daemon.signal(signal.SIGTERM)
    time.sleep(0.05)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert "already stopping, the emergency checkpoint is not cut short" in daemon.stderr
    assert "emergency checkpoint committed" in daemon.stderr
    assert savegame("verify", str(run)).returncode == 0


def test_the_scripts_own_monitor_protects_its_best_checkpoint(tmp_path):
    """`savegame run --keep-last 1` without --monitor: the worker's Checkpointer(monitor="loss")
    still makes the daemon's retention keep the best checkpoint."""
    run = tmp_path / "run"
    worker = ["-c", "import numpy as np, savegame\n"
                    "w = np.zeros(4)\nc = savegame.Checkpointer(monitor='loss', mode='min', every_epochs=1)\n"
                    "c.track(w=w); c.restore()\n"
                    "for epoch in c.epochs(6):\n    w += 1; c.step(); c.end_epoch(loss=[5, 1, 4, 3, 6, 7][epoch])\n"
                    "c.finish()\n"]
    daemon = Daemon(run, worker, ["--keep-last", "1"]).start()
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert committed_steps(run) == [2, 6]  # the best (loss 1 at step 2) and the newest
    assert "retention follows the worker's settings: monitor loss (min)" in daemon.stderr


def test_a_checkpoint_that_fails_while_loading_is_quarantined_and_the_one_before_used(tmp_path):
    """The daemon verified step N once; it is damaged afterwards; the restarted worker finds it
    while loading (exit 65), the daemon quarantines it and resumes from the one before."""
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 10),
                    ["--keep-last", "100"]).start()
    try:
        pid = daemon.worker_pid()
        wait_until(lambda: len(committed_steps(run)) >= 3)
        os.kill(pid, signal.SIGKILL)  # restart: the daemon verifies the latest and remembers it
        pid = daemon.worker_pid(other_than=pid)
        wait_until(lambda: (daemon.status() or {}).get("resumed_from") is not None)
        newest = daemon.status()["resumed_from"]
        payload = run / f"ckpt-{newest:012d}" / "state.safetensors"
        data = bytearray(payload.read_bytes())
        data[-1] ^= 0xFF  # flip one byte, size unchanged
        payload.write_bytes(data)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: "quarantined step" in daemon.stderr, timeout=30)
        wait_until(lambda: (daemon.status() or {}).get("resumed_from") not in (None, newest), timeout=30)
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert "exit code 65" in daemon.stderr and "bad-checkpoint" in daemon.stderr
    assert "checksum mismatch" in daemon.stderr
    assert [p.name.split(".")[0] for p in (run / ".quarantine").iterdir()] == [f"ckpt-{newest:012d}"]
    assert savegame("verify", str(run)).returncode == 0


def test_prune_from_the_command_line_spares_what_a_running_daemon_keeps(tmp_path):
    """The resume source is protected until the resumed worker commits past it; prune respects that."""
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--every", 50), ["--keep-last", "100"]).start()
    try:
        pid = daemon.ready()
        wait_until(lambda: len(committed_steps(run)) >= 3)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: (daemon.status() or {}).get("worker_pid") not in (None, pid))
        resumed = daemon.ready()
        os.kill(resumed, signal.SIGSTOP)  # hold it before it commits past its resume source
        source = daemon.status()["resumed_from"]
        assert committed_steps(run)[-1] == source
        wait_until(lambda: (daemon.status() or {}).get("protected"))
        result = savegame("prune", str(run), "--keep-last", "1", "--dry-run", "--json")
        assert result.returncode == 0, result.stderr
        plan = json.loads(result.stdout)
        assert source not in [d["step"] for d in plan["delete"]]
        kept = {k["step"]: k["why"] for k in plan["keep"]}
        assert any("running daemon" in why for why in kept[source])
        os.kill(resumed, signal.SIGCONT)
        wait_until(lambda: committed_steps(run)[-1] > source)
        wait_until(lambda: str(source) not in (daemon.status() or {}).get("protected", {}))  # let go once superseded
    finally:
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0


def test_keep_every_keeps_a_sparse_tail(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 60, "--every", 5), ["--keep-last", "2", "--keep-every", "20"]).start()
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert committed_steps(run) == [5, 20, 40, 55, 60]  # the first of each 20 steps, and the last 2


def test_a_worker_that_fails_before_loading_never_hides_a_checkpoint(tmp_path):
    """A dataset mount missing at start: the worker dies before it loads anything, again and again.
    That is the environment's fault: the newest verified checkpoint is never set aside."""
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 20, "--every", 5)).start()
    assert first.wait() == 0
    script = ["-c", "import sys; sys.exit('dataset not mounted: /mnt/data')"]
    again = Daemon(run, script, ["--max-restarts", "4", *fast_backoff(tmp_path)]).start()
    assert again.wait(timeout=60) == 1
    assert again.stderr.count("resuming from step 20") == 5  # every attempt from the newest
    assert "aside" not in again.stderr and "quarantined" not in again.stderr and "falling back" not in again.stderr


def test_a_worker_that_always_exits_75_is_restarted_with_backoff(tmp_path):
    """Exit 75 ('saved, resume me') forever used to restart about 370 times a second."""
    run = tmp_path / "run"
    daemon = Daemon(run, ["-c", "import sys; sys.exit(75)"], fast_backoff(tmp_path)).start()
    time.sleep(4)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0
    starts = daemon.stderr.count("worker started")
    assert 3 <= starts <= 40, starts
    assert "backing off" in daemon.stderr
    assert daemon.status()["restarts"].get("preempted", 0) >= 2


def test_a_command_missing_at_a_restart_is_retried_not_a_config_error(tmp_path):
    """The interpreter briefly missing at a restart (an upgrade in progress) is not a configuration
    error: the first start ran it, so the restart backs off and tries again."""
    import shutil
    run = tmp_path / "run"
    python = tmp_path / "python-copy"
    shutil.copy(os.path.realpath(__import__("sys").executable), python)
    daemon = Daemon(run, [], fast_backoff(tmp_path))
    daemon.cmd = daemon.cmd[:-1] + [str(python), "-c", "import time; time.sleep(0.5); raise SystemExit(3)"]
    daemon.env["PYTHONPATH"] = os.pathsep.join(__import__("sys").path)
    daemon.start()
    try:
        wait_until(lambda: "worker started" in daemon.stderr, timeout=30)
        python.rename(tmp_path / "python-away")
        wait_until(lambda: "cannot start the worker" in daemon.stderr, timeout=30)
        (tmp_path / "python-away").rename(python)
        wait_until(lambda: daemon.stderr.count("worker started") >= 2, timeout=30)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    finally:
        daemon.kill()
    assert "configuration" not in daemon.stderr


def test_the_daemon_verifies_the_checkpoint_before_the_worker_sees_it(tmp_path):
    """A byte flipped while no daemon ran: the daemon's own verification finds it, quarantines it and
    hands the worker the one before (the worker's checksum-on-load never has to catch it)."""
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 20, "--every", 5), ["--keep-last", "10"]).start()
    assert first.wait() == 0, first.stderr
    payload = run / "ckpt-000000000020" / "state.safetensors"
    data = bytearray(payload.read_bytes())
    data[len(data) // 2] ^= 0x01
    payload.write_bytes(data)
    again = Daemon(run, counter("--steps", 25, "--every", 5), ["--keep-last", "10"]).start()
    assert again.wait(timeout=60) == 0, again.stderr
    err = again.stderr
    assert "step 20 in" in err and "is damaged" in err and "checksum mismatch" in err
    assert "quarantined step 20" in err and "failed verification before resume" in err
    assert "resuming from step 15" in err
    assert "exit code 65" not in err and "bad-checkpoint" not in err


@pytest.mark.parametrize("status", [
    {"state": 7, "daemon_pid": "x", "last_checkpoint": [1], "heartbeat": "fast", "restarts": None, "mirror": 3},
    {"state": "running", "daemon_pid": 10**30, "protected": {"abc": 1, "12": "mine"}, "resumed_from": "7"},
    [1, 2, 3],
])
def test_a_status_file_with_wrong_types_is_not_a_traceback(tmp_path, status):
    run = tmp_path / "run"
    (run / ".savegame").mkdir(parents=True)
    (run / ".savegame" / "status.json").write_text(json.dumps(status))
    for args in (("status", str(run)), ("prune", str(run), "--dry-run"), ("ls", str(run))):
        result = savegame(*args)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        assert result.returncode in (0, 78), (args, result.stderr)


def test_a_crash_in_teardown_after_the_final_checkpoint_ends_the_run_on_the_restart(tmp_path):
    """A worker that dies after committing its final checkpoint (torch's gloo can abort at interpreter
    exit) is restarted like any crash; the restart resumes from the final step, trains nothing, and
    the run succeeds, with every step done exactly once and the final checkpoint intact."""
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 20, "--every", 5, "--abort-after-finish"),
                    ["--max-restarts", "3", *fast_backoff(tmp_path)]).start()
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    err = daemon.stderr
    assert "SIGABRT" in err and "resuming from step 20" in err, err
    assert daemon.stdout.count("DONE 20") == 2  # the restart's own check: no step done twice
    assert committed_steps(run)[-1] == 20 and savegame("verify", str(run)).returncode == 0
