"""Mirroring to a real S3-compatible server (moto_server on loopback)."""
import json
import os
import signal
import time

import pytest

from conftest import S3Server, free_port
from helpers import Daemon, committed_steps, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def bucket_steps(url, env):
    result = savegame("ls", url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return [row["step"] for row in json.loads(result.stdout) if row["status"] == "committed"]


def test_a_fresh_machine_resumes_from_the_bucket(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    first = Daemon(tmp_path / "vm1", counter("--steps", 40, "--every", 10), ["--mirror", url],
                   env=s3_server.env).start()
    assert first.wait() == 0, first.stderr
    assert bucket_steps(url, s3_server.env)[-1] == 40
    # A replacement VM: empty local disk, same bucket.
    second = Daemon(tmp_path / "vm2", counter("--steps", 60, "--every", 10), ["--mirror", url],
                    env=s3_server.env).start()
    assert second.wait() == 0, second.stderr
    assert "fetching step 40 from the mirror" in second.stderr
    assert f"from {url}" in second.stderr  # the resume is logged with its source
    assert "DONE 60" in second.stdout  # the worker checked that the weights it resumed match step 40
    assert bucket_steps(url, s3_server.env)[-1] == 60
    assert savegame("verify", url, env=s3_server.env).returncode == 0


def test_the_emergency_checkpoint_reaches_the_bucket_before_the_daemon_exits(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.005, "--size-mb", 4, "--every", 1000),
                    ["--mirror", url], env=s3_server.env).start()
    daemon.worker_pid()
    wait_until(lambda: (daemon.status() or {}).get("heartbeat"), timeout=10)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    newest_local = committed_steps(run)[-1]
    rows = json.loads(savegame("ls", url, "--json", env=s3_server.env).stdout)
    assert rows[-1]["step"] == newest_local and rows[-1]["reason"] == "emergency"
    assert daemon.stderr.index("emergency checkpoint committed") < daemon.stderr.index(f"mirrored step {newest_local}")


def test_a_mirror_outage_loses_nothing(tmp_path):
    """The server stops answering mid-upload and comes back later: local checkpoints the bucket has
    not confirmed are kept meanwhile, and everything reaches the bucket in the end."""
    server = S3Server(free_port())
    server.start()
    try:
        url = f"s3://{server.make_bucket()}/run"
        config = tmp_path / "savegame.toml"
        # A short deadline per remote operation: a stalled server is given up on, and retried later.
        config.write_text('mirror_deadline = 60\nupload_timeout = 2\n[mirror_keep]\nlast = 3\n')
        run = tmp_path / "run"
        daemon = Daemon(run, counter("--steps", 1200, "--sleep", 0.01, "--size-mb", 4, "--every", 10),
                        ["--config", str(config), "--mirror", url, "--keep-last", "1"], env=server.env).start()
        wait_until(lambda: ((daemon.status() or {}).get("mirror") or {}).get("confirmed_step"), timeout=20)
        os.kill(server.proc.pid, signal.SIGSTOP)  # mid-upload, most likely: one every 0.1 s
        try:
            time.sleep(6)  # uploads stall, overrun their deadline, and are retried with backoff
            # Local keeps only the last 1 by policy, but the 3 newest are what the bucket wants and has
            # not confirmed: they must stay.
            steps = committed_steps(run)
            assert len(steps) >= 3 and steps[-3:] == [steps[-1] - 20, steps[-1] - 10, steps[-1]], steps
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert daemon.wait(timeout=120) == 0, daemon.stderr
        assert "took longer than 2s" in daemon.stderr and "retrying in" in daemon.stderr  # the outage was seen
        assert bucket_steps(url, server.env) == [1180, 1190, 1200]
        assert savegame("verify", url, env=server.env).returncode == 0
        assert committed_steps(run) == [1200]  # once confirmed, local retention applies again
    finally:
        server.stop()


def test_a_missing_bucket_is_a_config_error(tmp_path, s3_server):
    result = savegame("run", "--dir", str(tmp_path / "run"), "--mirror", "s3://no-such-bucket-xyz/run", "--",
                      "true", env=s3_server.env)
    assert result.returncode == 78
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_credentials_never_reach_the_log(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": "testing"}
    daemon = Daemon(tmp_path / "run", counter("--steps", 10, "--every", 5), ["--mirror", url], env=env)
    daemon.cmd.insert(1, "-v")  # verbose logging: debug lines must not leak either
    daemon.start()
    assert daemon.wait() == 0, daemon.stderr
    assert "DEBUG" in daemon.stderr
    assert "testing" not in daemon.stderr and "testing" not in daemon.stdout
    result = savegame("ls", "s3://AKIA:SECRETSECRET@bucket/run")
    assert result.returncode == 78 and "SECRETSECRET" not in result.stderr


def test_a_checkpoint_that_no_event_announced_still_reaches_the_bucket(tmp_path, s3_server):
    """The folder watcher is the backstop for lost worker events: a checkpoint committed by a
    process that sends none is mirrored while the run goes on."""
    url = f"s3://{s3_server.make_bucket()}/run"
    worker = ["-c", "import os, time\nfrom savegame.storage import CheckpointStore\n"
                    "staged = CheckpointStore(os.environ['SAVEGAME_DIR']).begin(7)\n"
                    "staged.write_bytes('payload.bin', b'x' * 1000)\nstaged.commit()\ntime.sleep(60)\n"]
    daemon = Daemon(tmp_path / "run", worker, ["--mirror", url], env=s3_server.env).start()
    try:
        wait_until(lambda: bucket_steps(url, s3_server.env) == [7], timeout=30, interval=0.5)
    finally:
        daemon.signal(signal.SIGTERM)
        daemon.wait(timeout=30)


def test_falling_back_does_not_fetch_the_suspect_checkpoint_again(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    config = tmp_path / "fast.toml"
    config.write_text("backoff_initial = 0.1\nbackoff_max = 0.2\n")
    worker = counter("--steps", 50, "--every", 5, "--sleep", 0.01, "--crash-at", 12, "--crash-after-load", 10)
    daemon = Daemon(tmp_path / "run", worker, ["--max-restarts", "10", "--mirror", url, "--config", str(config)],
                    env=s3_server.env).start()
    assert daemon.wait(timeout=60) == 1
    err = daemon.stderr
    assert "setting step 10 aside" in err
    after = err.split("setting step 10 aside")[1]
    assert "resuming from step 5" in after and "fetching step 10" not in after
