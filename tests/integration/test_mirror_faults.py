"""The mirror against a bad network (a fault proxy in front of the S3 server): the emergency
checkpoint jumps the queue, a stop cuts every wait short, every terminal state flushes, and the
exit code tells the truth about what the bucket holds."""
import json
import re
import signal
import time

import pytest

from helpers import Daemon, committed_steps, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def bucket_rows(url, env):
    result = savegame("ls", url, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def settings(tmp_path, text):
    path = tmp_path / "savegame.toml"
    path.write_text(text)
    return ["--config", str(path)]


def mirrored_order(stderr):
    return [int(line.split("mirrored step ")[1].split()[0]) for line in stderr.splitlines() if "mirrored step " in line]


def test_an_abandoned_upload_is_not_called_mirrored_and_the_exit_code_says_so(tmp_path, s3_server, fault_proxy):
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    options = ["--mirror", url, *settings(tmp_path, "upload_timeout = 2\nmirror_deadline = 6\n")]
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--size-mb", 2, "--every", 100000),
                    options, env=fault_proxy.env()).start()
    try:
        wait_until(lambda: (daemon.status() or {}).get("heartbeat"), timeout=30)
        fault_proxy.fail("PUT", r"state\.safetensors", "stall")  # every payload upload hangs
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 74, daemon.stderr
    finally:
        daemon.kill()
    emergency = committed_steps(run)[-1]
    assert f"the emergency checkpoint (step {emergency}) is NOT in the mirror" in daemon.stderr
    assert "holds every checkpoint" not in daemon.stderr
    assert daemon.status()["mirror"]["missing"] == [emergency]
    fault_proxy.clear()
    assert emergency not in [r["step"] for r in bucket_rows(url, s3_server.env)]


def test_the_emergency_checkpoint_jumps_a_backlog_on_a_slow_uplink(tmp_path, s3_server, fault_proxy):
    """Periodic checkpoints pile up behind a 3 MB/s uplink; on SIGTERM the emergency step goes first."""
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    options = ["--mirror", url, *settings(tmp_path, "mirror_deadline = 12\n[keep]\nlast = 50\n[mirror_keep]\nlast = 50\n")]
    fault_proxy.upload_rate = 3e6
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.02, "--size-mb", 4, "--every", 5),
                    options, env=fault_proxy.env()).start()
    try:
        wait_until(lambda: len(committed_steps(run)) >= 6, timeout=60)  # a backlog: 24 MB at 3 MB/s
        daemon.signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    finally:
        daemon.kill()
    emergency = committed_steps(run)[-1]
    stopped_at = daemon.stderr.index("SIGTERM: asking the worker")
    after_stop = mirrored_order(daemon.stderr[stopped_at:])
    assert after_stop and after_stop[0] == emergency, daemon.stderr[-3000:]
    assert emergency in [r["step"] for r in bucket_rows(url, s3_server.env)]
    missing = daemon.status()["mirror"]["missing"]
    assert code == (74 if missing else 0)  # the rest of the backlog may not fit the deadline: said so


def test_a_stop_cuts_the_retry_backoff_short(tmp_path, s3_server, fault_proxy):
    """After an outage the mirror backs off (8 s here); the server comes back and SIGTERM arrives:
    the emergency upload is tried at once, not after the backoff (which outlasts mirror_deadline)."""
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    options = ["--mirror", url, *settings(tmp_path, "mirror_deadline = 6\n")]
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.02, "--every", 20), options,
                    env=fault_proxy.env()).start()
    try:
        wait_until(lambda: "mirrored step" in daemon.stderr, timeout=60)
        fault_proxy.refuse()
        wait_until(lambda: "retrying in 8.0s" in daemon.stderr, timeout=120)
        fault_proxy.accept()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, daemon.stderr[-3000:]
    finally:
        daemon.kill()
    emergency = committed_steps(run)[-1]
    assert emergency in [r["step"] for r in bucket_rows(url, s3_server.env)]


def test_a_failed_final_flush_is_not_a_success(tmp_path, s3_server, fault_proxy):
    url = f"s3://{s3_server.make_bucket()}/run"
    options = ["--mirror", url, *settings(tmp_path, "mirror_deadline = 3\nupload_timeout = 2\n")]
    script = ["-c", "import os, numpy as np, savegame\n"
                    "w = np.zeros(4)\nc = savegame.Checkpointer(every_steps=1000)\nc.track(w=w)\nc.restore()\n"
                    "import urllib.request\n"
                    f"urllib.request.urlopen('{fault_proxy.endpoint}/__stall__', timeout=1) if False else None\n"
                    "for _ in range(20):\n    w += 1\n    c.step()\n"
                    "c.finish()\n"]
    fault_proxy.fail("PUT", r"state\.safetensors", "stall")
    daemon = Daemon(tmp_path / "run", script, options, env=fault_proxy.env()).start()
    try:
        assert daemon.wait(timeout=60) == 74, daemon.stderr[-3000:]
    finally:
        daemon.kill()
    assert "worker finished (exit code 0)" in daemon.stderr
    assert "does not hold steps [20]" in daemon.stderr


def test_a_run_that_gives_up_still_flushes_the_mirror(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    config = tmp_path / "fast.toml"
    config.write_text("backoff_initial = 0.1\nbackoff_max = 0.2\n")
    daemon = Daemon(tmp_path / "run", counter("--steps", 50, "--every", 5, "--sleep", 0.01, "--crash-at", 12),
                    ["--max-restarts", "2", "--mirror", url, "--config", str(config)], env=s3_server.env).start()
    assert daemon.wait(timeout=60) == 1, daemon.stderr
    assert "giving up" in daemon.stderr
    assert [r["step"] for r in bucket_rows(url, s3_server.env)][-1] == 10
    assert "holds every checkpoint it should" in daemon.stderr


def test_a_mirror_outage_does_not_stop_local_retention(tmp_path, s3_server, fault_proxy):
    """With the bucket unreachable, the local disk keeps what its own policy keeps plus the few the
    bucket would keep, not every checkpoint since the outage began (136 in 60 s, then a full disk)."""
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    options = ["--mirror", url, "--keep-last", "2", *settings(tmp_path, "mirror_deadline = 1\n[mirror_keep]\nlast = 3\n")]
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.005, "--every", 2), options,
                    env=fault_proxy.env()).start()
    try:
        wait_until(lambda: "mirrored step" in daemon.stderr, timeout=60)
        fault_proxy.refuse()
        wait_until(lambda: daemon.stderr.count("mirror to") >= 2, timeout=120)  # failing, and retrying
        time.sleep(3)
        steps = committed_steps(run)
        assert len(steps) <= 2 + 3 + 1, steps  # local policy, what the bucket would keep, one in flight
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 74  # the bucket lacks the newest: said so
    finally:
        daemon.kill()


def test_an_upload_slower_than_the_checkpoints_still_completes(tmp_path, s3_server, fault_proxy):
    """On a slow uplink new checkpoints arrive faster than one uploads, so the step being uploaded soon
    falls out of the few the bucket would keep. Local retention must leave it alone until its upload
    ends: deleting it under the upload made every upload fail, and the bucket never got anything."""
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    fault_proxy.upload_rate = 1e6  # about 1 s per 1 MB checkpoint; one is committed every ~60 ms
    options = ["--mirror", url, "--keep-last", "2", *settings(tmp_path, "[mirror_keep]\nlast = 2\n")]
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.03, "--every", 2), options,
                    env=fault_proxy.env()).start()
    try:
        wait_until(lambda: daemon.stderr.count("mirrored step") >= 2, timeout=60)
    finally:
        daemon.kill()
    deleted: set[int] = set()
    for line in daemon.stderr.splitlines():
        if "deleted local steps" in line:
            deleted.update(json.loads(line.rsplit(" steps ", 1)[1]))
        elif (mirrored := re.search(r"mirrored step (\d+) ", line)) is not None:
            assert int(mirrored.group(1)) not in deleted, f"step {mirrored.group(1)} was deleted during its upload"
    assert deleted, "local retention never ran"
