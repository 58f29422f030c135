"""Start-up against a bad world: an unreadable or stalled mirror, a read-only or full run folder,
a mirror that is the run folder, an old run in the folder, a damaged manifest with a good copy in
the bucket. Never a fresh start that forks the run, never a traceback, never a long silence."""
import os
import signal
import subprocess
import time

import pytest

from helpers import Daemon, committed_steps, counter, savegame, wait_until

pytestmark = pytest.mark.integration


def settings(tmp_path, text):
    path = tmp_path / "savegame.toml"
    path.write_text(text)
    return ["--config", str(path)]


def test_a_fresh_vm_waits_for_an_unreadable_mirror_instead_of_starting_fresh(tmp_path, s3_server, fault_proxy):
    url = f"s3://{s3_server.make_bucket()}/run"
    first = Daemon(tmp_path / "vm1", counter("--steps", 20, "--every", 5), ["--mirror", url], env=s3_server.env).start()
    assert first.wait() == 0, first.stderr
    fault_proxy.refuse()  # the replacement VM boots before its network is up
    fresh = Daemon(tmp_path / "vm2", counter("--steps", 30, "--every", 5), ["--mirror", url],
                   env=fault_proxy.env()).start()
    try:
        wait_until(lambda: "not starting fresh: retrying" in fresh.stderr, timeout=120)
        assert "starting fresh" not in fresh.stderr.replace("not starting fresh", "")
        assert fresh.status()["state"] == "starting"
        fault_proxy.accept()
        assert fresh.wait(timeout=120) == 0, fresh.stderr[-3000:]
    finally:
        fresh.kill()
    assert "fetching step 20 from the mirror" in fresh.stderr and "DONE 30" in fresh.stdout


def test_a_mirror_that_stays_unreadable_ends_the_start_with_a_clear_message(tmp_path, s3_server, fault_proxy):
    url = f"s3://{s3_server.make_bucket()}/run"
    fault_proxy.refuse()
    fresh = Daemon(tmp_path / "vm", counter("--steps", 30), ["--mirror", url, *settings(tmp_path, "mirror_wait = 2\n")],
                   env=fault_proxy.env()).start()
    try:
        assert fresh.wait(timeout=180) == 74, fresh.stderr[-3000:]
    finally:
        fresh.kill()
    assert "Not starting fresh" in fresh.stderr and "Traceback" not in fresh.stderr
    assert fresh.status()["state"] == "failed"
    assert not committed_steps(tmp_path / "vm")


def test_a_stalled_bucket_does_not_delay_a_resume_that_local_checkpoints_serve(tmp_path, s3_server, fault_proxy):
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 20, "--every", 5), ["--mirror", url], env=fault_proxy.env()).start()
    assert first.wait() == 0, first.stderr
    fault_proxy.stall = True  # accepts connections, never answers
    started = time.monotonic()
    again = Daemon(run, counter("--steps", 100000, "--every", 1000, "--sleep", 0.01),
                   ["--mirror", url, *settings(tmp_path, "mirror_deadline = 2\n")], env=fault_proxy.env()).start()
    try:
        wait_until(lambda: (again.status() or {}).get("state") == "running", timeout=60)
        assert time.monotonic() - started < 20  # was about 14 minutes
        assert "resuming from step 20" in again.stderr and "from local" in again.stderr
        again.signal(signal.SIGTERM)
        assert again.wait(timeout=60) in (0, 74)
    finally:
        again.kill()
        fault_proxy.stall = False


def test_the_run_folder_on_a_read_only_mount_is_a_config_error(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = savegame("run", "--dir", str(mnt / "run"), "--", "true")
        assert result.returncode == 78, result.stderr
        assert "not writable" in result.stderr and "Read-only file system" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_run_folder_on_a_full_disk_exits_74_with_a_message(tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "run" / ".savegame").mkdir(parents=True)
        with open(mnt / "filler", "wb") as f:
            try:
                f.write(b"x" * (1 << 20))
            except OSError:
                pass
        result = savegame("run", "--dir", str(mnt / "run"), "--", "true")
        assert result.returncode == 74, result.stderr
        assert "full disk" in result.stderr and "Traceback" not in result.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("spelling", ["{run}", "file://{run}", "{run}/", "{run}/../run", "file://{run}/./"])
def test_a_mirror_that_is_the_run_folder_is_refused_in_any_spelling(tmp_path, spelling):
    run = tmp_path / "run"
    run.mkdir()
    result = savegame("run", "--dir", str(run), "--mirror", spelling.format(run=run), "--", "true")
    assert result.returncode == 78, result.stderr
    assert "is the run folder itself" in result.stderr


def test_a_symlinked_mirror_to_the_run_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(run, tmp_path / "alias")
    result = savegame("run", "--dir", str(run), "--mirror", str(tmp_path / "alias"), "--", "true")
    assert result.returncode == 78 and "is the run folder itself" in result.stderr


def test_resume_none_over_an_earlier_run_is_refused_and_deletes_nothing(tmp_path):
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 20, "--every", 5)).start()
    assert first.wait() == 0
    before = committed_steps(run)
    again = Daemon(run, counter("--steps", 20, "--every", 5), ["--resume", "none"]).start()
    assert again.wait(timeout=30) == 78
    assert "already holds checkpoints of an earlier run" in again.stderr and str(run) in again.stderr
    assert committed_steps(run) == before


def test_a_damaged_local_manifest_with_a_good_copy_in_the_mirror_resumes_from_the_mirror(tmp_path, s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 20, "--every", 5), ["--mirror", url, "--keep-last", "10"],
                   env=s3_server.env).start()
    assert first.wait() == 0, first.stderr
    (run / "ckpt-000000000020" / "manifest.json").write_text("{ not json")
    again = Daemon(run, counter("--steps", 30, "--every", 5), ["--mirror", url, "--keep-last", "10"],
                   env=s3_server.env).start()
    assert again.wait(timeout=60) == 0, again.stderr[-3000:]
    assert "fetching step 20 from the mirror" in again.stderr
    assert "quarantined step 20" in again.stderr
    assert [p.name.split(".")[0] for p in (run / ".quarantine").iterdir()] == ["ckpt-000000000020"]
    assert "DONE 30" in again.stdout
