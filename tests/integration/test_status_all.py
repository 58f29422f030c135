"""`savegame status --all ROOT`: one line (or JSON object) per run folder one level below ROOT, from
real run folders left by real daemons, and an exit status a monitoring check can use (1 when any run
failed or is stale: not finished, and its daemon is gone or has stopped writing its status)."""
import json
import os
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import SAVEGAME, Daemon, clean_env, committed_steps, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def status_all(root: Path, *extra: str) -> tuple[int, list[dict]]:
    result = savegame("status", "--all", str(root), "--json", *extra)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """ROOT with five run folders (running, stopped, failed, succeeded, a dead daemon) and a folder
    that is not a run. The running one is stopped when the module's tests are done."""
    root = tmp_path_factory.mktemp("runs")
    bucket = tmp_path_factory.mktemp("bucket")
    running = Daemon(root / "running", counter("--steps", 100000, "--sleep", 0.01, "--every", 20)).start()
    stopped = Daemon(root / "stopped", counter("--steps", 100000, "--sleep", 0.01, "--every", 20)).start()
    dead = Daemon(root / "dead", counter("--steps", 100000, "--sleep", 0.01, "--every", 20)).start()
    failed = Daemon(root / "failed", ["-c", "raise SystemExit(3)"], ["--max-restarts", "0"]).start()
    done = Daemon(root / "succeeded", counter("--steps", 20, "--every", 5, "--epoch-steps", 5, "--metric",
                                              "--best-epoch", 2), ["--keep-last", "10", "--mirror", str(bucket)]).start()
    started = [running, stopped, dead, failed, done]
    for daemon in started:  # this module's daemons outlive each test (no_leftover_daemons would kill them)
        Daemon.started.remove(daemon)
    for daemon in (running, stopped, dead):
        daemon.ready()
    wait_until(lambda: committed_steps(root / "running") and committed_steps(root / "dead"), timeout=30)
    stopped.signal(signal.SIGTERM)
    dead.kill()  # SIGKILL: its status file still says "running"
    assert stopped.wait(timeout=30) == 0 and failed.wait(timeout=30) == 1 and done.wait(timeout=60) == 0
    (root / "notes").mkdir()  # not a run folder: not listed
    (root / ".cache").mkdir()  # the service user's home holds its cache here: not a run either
    try:
        yield root, running
    finally:
        for daemon in started:
            daemon.kill()


def test_one_row_per_run_with_its_state_and_a_failing_exit(runs):
    root, running = runs
    code, rows = status_all(root)
    by_name = {row["run"]: row for row in rows}
    assert list(by_name) == ["dead", "failed", "running", "stopped", "succeeded"]  # sorted; no "notes", ".cache"
    assert code == 1
    assert {name: row["state"] for name, row in by_name.items()} == {
        "dead": "running", "failed": "failed", "running": "running", "stopped": "stopped", "succeeded": "succeeded"}
    assert {name for name, row in by_name.items() if row["problem"]} == {"dead", "failed"}
    assert "daemon" in by_name["dead"]["problem"] and "gone" in by_name["dead"]["problem"]
    assert by_name["dead"]["stale"] and not by_name["running"]["stale"]
    assert by_name["failed"]["restarts"] == {} and "giving up" in by_name["failed"]["problem"]
    live = by_name["running"]
    assert live["worker_pid"] == running.status()["worker_pid"] and live["daemon_pid"] == running.proc.pid
    assert live["last_checkpoint"]["step"] >= 20 and live["last_checkpoint"]["age_s"] >= 0
    best = by_name["succeeded"]["best"]
    assert best == {"metric": "loss", "mode": "min", "value": 1.0, "step": 10}, best  # epoch 2 ends at step 10
    assert by_name["succeeded"]["mirror"]["pending"] == 0 and by_name["succeeded"]["mirror"]["lag_s"] is not None
    assert by_name["running"]["mirror"] is None


def test_the_text_table_has_one_line_per_run(runs):
    root, _ = runs
    result = savegame("status", "--all", str(root))
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["RUN", "STATE", "WORKER"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"dead", "failed", "running", "stopped", "succeeded"}
    assert "STALE" in rows["dead"] and "FAILED" in rows["failed"]
    assert "loss 1 @10" in rows["succeeded"]


def test_only_healthy_runs_exit_0(tmp_path):
    assert Daemon(tmp_path / "a", counter("--steps", 3)).start().wait(timeout=30) == 0
    assert Daemon(tmp_path / "b", counter("--steps", 3)).start().wait(timeout=30) == 0
    code, rows = status_all(tmp_path)
    assert code == 0 and [(row["run"], row["state"], row["problem"]) for row in rows] == [
        ("a", "succeeded", None), ("b", "succeeded", None)]


def test_a_frozen_daemon_is_stale(runs):
    """SIGSTOP: the daemon lives but writes nothing; past --stale-after it counts as stale."""
    root, running = runs
    running.signal(signal.SIGSTOP)
    try:
        def stale() -> bool:
            return {r["run"]: r for r in status_all(root, "--stale-after", "2")[1]}["running"]["stale"]
        wait_until(stale, timeout=30, interval=0.5)
        row = {r["run"]: r for r in status_all(root, "--stale-after", "2")[1]}["running"]
        assert "has not updated the status for" in row["problem"]
    finally:
        running.signal(signal.SIGCONT)
    wait_until(lambda: not {r["run"]: r for r in status_all(root, "--stale-after", "2")[1]}["running"]["stale"],
               timeout=30, interval=0.5)


def test_bad_roots_say_what_is_wrong(runs, tmp_path):
    root, _ = runs
    missing = savegame("status", "--all", str(tmp_path / "nowhere"))
    assert missing.returncode == 78 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
    a_run = savegame("status", "--all", str(root / "stopped"))
    assert a_run.returncode == 78 and f"savegame status {root / 'stopped'}" in a_run.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = savegame("status", "--all", str(empty))
    assert nothing.returncode == 0 and "no runs" in nothing.stdout
    assert savegame("status", "--all", str(empty), "--json").stdout.strip() == "[]"
    bad = savegame("status", "--all", str(root), "--stale-after", "-1")
    assert bad.returncode == 2 and "--stale-after" in bad.stderr


def nobody_can_run_savegame() -> bool:
    if os.geteuid() != 0:
        return False
    try:
        return subprocess.run([SAVEGAME, "--help"], capture_output=True, user="nobody", timeout=60).returncode == 0
    except OSError:
        return False


@pytest.mark.skipif(not nobody_can_run_savegame(), reason="needs root, and a savegame another user may run")
def test_a_run_folder_the_caller_cannot_read_is_a_problem_not_silence(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="savegame-status-"))
    try:
        root.chmod(0o755)
        (root / "private" / ".savegame").mkdir(parents=True)
        (root / "private").chmod(0o700)
        env = clean_env()
        result = subprocess.run([SAVEGAME, "status", "--all", str(root), "--json"], capture_output=True, text=True,
                                env=env, user="nobody", timeout=60)
        assert result.returncode == 1, result.stderr
        [row] = json.loads(result.stdout)
        assert row["run"] == "private" and "cannot read" in row["problem"]
    finally:
        (root / "private").chmod(stat.S_IRWXU)
        import shutil
        shutil.rmtree(root)
