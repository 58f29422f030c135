"""SIGKILL the worker at random moments (mid-step, mid-save, inside a commit): the run always
finishes with the exact final step count and never resumes from a torn checkpoint."""
import os
import random
import signal
import struct
import threading
import time

import pytest

from helpers import Daemon, counter, savegame, wait_until

pytestmark = pytest.mark.chaos
STEPS = 120


def progress_step(daemon: Daemon):
    """The step the current worker has reached, from the daemon's progress cell."""
    try:
        (step,) = struct.unpack("<q", (daemon.run_dir / ".savegame" / "progress").read_bytes()[:8])
    except (FileNotFoundError, struct.error):
        return None
    return None if step < 0 else step


def kill_randomly(daemon: Daemon, rng: random.Random, kills: int) -> list[int]:
    killed = []
    last = None
    for _ in range(kills):
        try:
            pid = daemon.worker_pid(timeout=20, other_than=last)
        except TimeoutError:
            break  # the run finished first
        # Past start-up (the worker has reached a step boundary): mid-step, mid-save, mid-commit.
        try:
            wait_until(lambda: progress_step(daemon) is not None, timeout=20)
        except TimeoutError:
            break
        time.sleep(rng.uniform(0.0, 0.4))
        try:
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        except ProcessLookupError:
            pass
        last = pid
    return killed


def seeds(run: range, soak: range) -> list:
    """The seeds every `make test` runs, then those only `make test-soak` runs (CI stays short)."""
    return [*run, *(pytest.param(seed, marks=pytest.mark.soak) for seed in soak)]


@pytest.mark.parametrize("seed", seeds(range(12), range(12, 30)))
def test_random_sigkills_never_lose_or_repeat_a_step(tmp_path, seed):
    check_random_sigkills(tmp_path, seed, [])


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
@pytest.mark.parametrize("seed", seeds(range(100, 104), range(104, 110)))
def test_random_sigkills_with_the_shared_memory_hand_over_and_restores_from_ram(tmp_path, seed):
    """The same with saves handed over to the daemon and restarts reading the kept copy: kills land
    in the copy into a segment, between the hand-over and the commit, and in a load from RAM."""
    daemon = check_random_sigkills(tmp_path, seed, ["--shared-memory"])
    assert "from shared memory" in daemon.stderr  # the hand-over was in use


def check_random_sigkills(tmp_path, seed: int, options: list[str]) -> Daemon:
    rng = random.Random(seed)
    run = tmp_path / "run"
    # 8 MB of state saved every 4 steps: kills land inside writes and commits as often as between them.
    worker = counter("--steps", STEPS, "--sleep", 0.003, "--size-mb", 8, "--every", 4)
    config = tmp_path / "savegame.toml"
    config.write_text("backoff_initial = 0.05\nbackoff_max = 0.2\n")  # keep the test fast
    daemon = Daemon(run, worker, ["--config", str(config), "--max-restarts", "20", "--keep-last", "3", *options]).start()
    killed: list[int] = []
    killer = threading.Thread(target=lambda: killed.extend(kill_randomly(daemon, rng, rng.randint(2, 4))))
    killer.start()
    try:
        assert daemon.wait(timeout=120) == 0, daemon.stderr[-3000:]
    finally:
        killer.join()
        daemon.kill()
    assert killed, "no kill landed: the test tested nothing"
    assert daemon.status()["restarts"].get("killed", 0) >= 1
    # The worker itself asserts that the recorded steps are exactly 0..STEPS-1 and that the
    # restored weights match their step; a torn checkpoint would fail its checksum on load.
    assert f"DONE {STEPS}" in daemon.stdout
    # Never a torn checkpoint: nothing failed verification or loading. (Kills that keep landing at
    # the same step may make the daemon fall back one checkpoint; that is the policy, not damage.)
    for symptom in ("is damaged", "failed verification", "could not load", "cannot resume"):
        assert symptom not in daemon.stderr
    verify = savegame("verify", str(run))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not any((run / ".staging").iterdir()), "stale staging was not collected"
    return daemon
