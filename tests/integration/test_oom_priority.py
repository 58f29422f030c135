"""The unit protects the daemon from the OOM killer (OOMScoreAdjust=-500); its worker, which holds
the memory, must not inherit that protection: it runs at 0 (or `worker_oom_score_adj`) from its
very first instruction, and so does everything it starts.

A negative daemon score needs CAP_SYS_RESOURCE to set up (systemd has it; a test machine may not):
those cases skip without it. The same mechanism is tested unprivileged with a daemon at +500,
which a worker may lower back to 0 (children inherit the score either way)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import Daemon, wait_until

pytestmark = pytest.mark.integration

# Starts `savegame run` with its own score lowered, as systemd does for the unit (lowering needs
# CAP_SYS_RESOURCE: the tests run as root; elsewhere they skip).
LOWERED = ("import os, sys\nwith open('/proc/self/oom_score_adj', 'w') as f:\n    f.write(sys.argv[1])\n"
           "os.execv(sys.argv[2], sys.argv[2:])")


def can_lower_oom_score() -> bool:
    probe = subprocess.run([sys.executable, "-c", LOWERED, "-500", "/bin/true"], capture_output=True)
    return probe.returncode == 0


PRIVILEGED = can_lower_oom_score()
needs_privilege = pytest.mark.skipif(not PRIVILEGED, reason="lowering oom_score_adj needs CAP_SYS_RESOURCE")
DAEMON_SCORES = [pytest.param(-500, marks=needs_privilege), 500]


def daemon_with_score(run: Path, score: int, worker: list, options: list = ()) -> Daemon:
    daemon = Daemon(run, worker, options)
    daemon.cmd = [sys.executable, "-c", LOWERED, str(score), *daemon.cmd]
    return daemon


def probing_worker(probe: Path) -> list:
    """A worker whose first instruction records its score, and a child it forks at once records its own."""
    return ["-c", "import os\nscore = open('/proc/self/oom_score_adj').read().strip()\n"
                  "child = os.fork()\n"
                  "if child == 0:\n"
                  f"    open({str(probe)!r} + '.child', 'w').write(open('/proc/self/oom_score_adj').read())\n"
                  "    os._exit(0)\n"
                  "os.waitpid(child, 0)\n"
                  f"open({str(probe)!r}, 'w').write(score)\n"]


@pytest.mark.parametrize("daemon_score", DAEMON_SCORES)
def test_the_worker_does_not_inherit_the_daemons_oom_score(tmp_path, daemon_score):
    probe = tmp_path / "score"
    daemon = daemon_with_score(tmp_path / "run", daemon_score, probing_worker(probe)).start()
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert probe.read_text().strip() == "0", "the worker ran with the daemon's protection"
    assert Path(f"{probe}.child").read_text().strip() == "0"


@pytest.mark.parametrize("daemon_score", DAEMON_SCORES)
def test_worker_oom_score_adj_sets_the_workers_score(tmp_path, daemon_score):
    config = tmp_path / "run.toml"
    config.write_text("worker_oom_score_adj = 300\n")
    probe = tmp_path / "score"
    daemon = daemon_with_score(tmp_path / "run", daemon_score, probing_worker(probe), ["--config", str(config)]).start()
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert probe.read_text().strip() == "300" and Path(f"{probe}.child").read_text().strip() == "300"


@pytest.mark.parametrize("daemon_score", DAEMON_SCORES)
def test_a_running_worker_and_the_daemon_keep_their_scores(tmp_path, daemon_score):
    from helpers import counter

    daemon = daemon_with_score(tmp_path / "run", daemon_score, counter("--steps", 100000, "--sleep", 0.01)).start()
    try:
        worker = daemon.ready()
        assert Path(f"/proc/{worker}/oom_score_adj").read_text().strip() == "0"
        assert Path(f"/proc/{daemon.proc.pid}/oom_score_adj").read_text().strip() == str(daemon_score)
    finally:
        daemon.signal(15)
        assert daemon.wait(timeout=30) == 0, daemon.stderr


def test_a_command_the_shim_cannot_execute_is_a_spawn_error_not_a_crash(tmp_path):
    """With a score to set, the worker starts through an exec shim; a command that cannot be executed
    still fails the spawn itself, with the reason (not a worker that died with some exit code)."""
    import errno

    from savegame.daemon.process import SpawnError, WorkerProcess, own_oom_score_adj

    script = tmp_path / "not-executable"
    script.write_text("#!/bin/sh\n")
    for command, code in (([str(tmp_path / "missing")], errno.ENOENT), ([str(script)], errno.EACCES)):
        with pytest.raises(SpawnError) as info:
            WorkerProcess(command, dict(os.environ), oom_score_adj=own_oom_score_adj() + 1)
        assert info.value.errno == code and repr(command[0]) in str(info.value.strerror)
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT)
    worker = WorkerProcess(["/bin/sh", "-c", "cat /proc/self/oom_score_adj; exit 3"], dict(os.environ),
                           oom_score_adj=own_oom_score_adj() + 1, stdout=out)
    os.close(out)
    wait_until(lambda: worker.poll(), timeout=10)
    assert worker.poll() == (3, None) and int((tmp_path / "out").read_text()) == own_oom_score_adj() + 1


def test_a_command_missing_at_a_restart_through_the_shim_is_retried(tmp_path):
    import shutil

    python = tmp_path / "python-copy"
    shutil.copy(os.path.realpath(sys.executable), python)
    (tmp_path / "c.toml").write_text("worker_oom_score_adj = 100\n")  # differs from the daemon's: the shim runs
    daemon = Daemon(tmp_path / "run", [], ["--config", str(tmp_path / "c.toml"), "--max-restarts", "50"])
    daemon.cmd = daemon.cmd[:-1] + [str(python), "-c", "import time; time.sleep(0.5); raise SystemExit(3)"]
    daemon.env["PYTHONPATH"] = os.pathsep.join(sys.path)
    daemon.start()
    try:
        wait_until(lambda: "worker started" in daemon.stderr, timeout=30)
        python.rename(tmp_path / "python-away")
        wait_until(lambda: "cannot start the worker" in daemon.stderr, timeout=30)
        (tmp_path / "python-away").rename(python)
        wait_until(lambda: daemon.stderr.count("worker started") >= 2, timeout=60)
        daemon.signal(15)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    finally:
        daemon.kill()
    assert "No such file" in daemon.stderr and "configuration" not in daemon.stderr


@pytest.mark.skipif(PRIVILEGED, reason="checks the message an unprivileged daemon gives")
def test_a_score_the_daemon_may_not_give_is_said_once_and_the_worker_still_runs(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("worker_oom_score_adj = -100\n")  # lower than the daemon's 0: needs CAP_SYS_RESOURCE
    probe = tmp_path / "score"
    daemon = Daemon(tmp_path / "run", probing_worker(probe), ["--config", str(config)]).start()
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    assert probe.read_text().strip() == "0"
    assert daemon.stderr.count("cannot set the worker's oom_score_adj to -100") == 1, daemon.stderr
    assert "CAP_SYS_RESOURCE" in daemon.stderr and "Traceback" not in daemon.stderr
