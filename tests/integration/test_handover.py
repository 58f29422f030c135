"""The shared-memory hand-over, with real processes and signals: a supervised torch worker hands its
saves to the daemon in /dev/shm; the daemon commits them, even when the worker is SIGKILLed right
after the hand-over, and no segment outlives the run (or a SIGKILLed worker, or daemon)."""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest

from helpers import TESTS, Daemon, clean_env, committed_steps, counter, savegame, wait_until
from savegame.snapshot.folder import SHM_ROOT, folder_for
from savegame.snapshot.layout import CONTROL, SEGMENT_NAME, Status

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not os.path.isdir(SHM_ROOT), reason="no /dev/shm"),
              pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the worker needs torch")]
WORKER = str(TESTS / "workers" / "torch_handover_worker.py")


def fast_backoff(tmp_path: Path) -> list[str]:
    config = tmp_path / "fast.toml"
    config.write_text("backoff_initial = 0.1\nbackoff_max = 0.2\n")
    return ["--config", str(config)]


def owner(name: str) -> int:
    """The process a segment belongs to (-1: a kept one, the daemon's)."""
    match = SEGMENT_NAME.match(name)
    return int(match.group(1)) if match else -1


def segments(folder: str) -> dict[str, tuple[int, int, int]]:
    """name -> (status, step, size) of every segment file in the folder (kept ones too)."""
    found = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        try:
            with open(os.path.join(folder, name), "rb", buffering=0) as f:
                head = f.read(CONTROL.size)
                size = os.fstat(f.fileno()).st_size
        except FileNotFoundError:
            continue
        if len(head) == CONTROL.size:
            _magic, _version, status, _seq, step, _cap, _off, _len = CONTROL.unpack(head)
            found[name] = (status, step, size)
    return found


def kill_when_handed_over(folder: str, pid: int, timeout: float = 60) -> tuple[int, int]:
    """SIGKILL `pid` the moment one of its segments turns READY; (the step it holds, files seen)."""
    deadline = time.monotonic() + timeout
    most = 0
    while time.monotonic() < deadline:
        mine = {n: v for n, v in segments(folder).items() if owner(n) == pid}
        most = max(most, len(mine))
        for status, step, _size in mine.values():
            if status == Status.READY:
                os.kill(pid, signal.SIGKILL)
                return step, most
        time.sleep(0.0002)
    raise TimeoutError(f"worker {pid} handed nothing over within {timeout}s")


def verify_ok(run: Path, step: int) -> None:
    result = savegame("verify", str(run), "--step", str(step), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(entry["ok"] for entry in json.loads(result.stdout)), result.stdout


@pytest.mark.parametrize("kills", [10, pytest.param(20, marks=pytest.mark.soak)])  # the 20 of 20: soak
def test_a_worker_killed_right_after_the_hand_over_still_gets_it_committed_and_resumes_from_it(tmp_path, kills):
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "4", "--sleep", "0.003", "--keep-last", "1000"],
                    ["--shared-memory", "--max-restarts", "100", *fast_backoff(tmp_path)]).start()
    folder = folder_for(str(run))
    killed, pid, files_seen = [], None, 0
    for attempt in range(1, kills + 1):
        wait_until(lambda: f"attempt {attempt}\n" in daemon.stdout, 60)
        pid = daemon.worker_pid(other_than=pid)
        step, most = kill_when_handed_over(folder, pid)
        killed.append(step)
        files_seen = max(files_seen, most)
        # the next worker starts from exactly that checkpoint: committed by the daemon, not by the dead worker
        wait_until(lambda: f"resumed {step} attempt {attempt + 1}\n" in daemon.stdout, 60)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    assert files_seen <= 2
    steps = committed_steps(run)
    for step in killed:
        assert step in steps
        verify_ok(run, step)
    assert not os.path.exists(folder), "the run's segment folder outlived the run"


def test_a_checkpoint_handed_over_is_identical_to_one_written_in_process(tmp_path):
    alone, supervised = tmp_path / "alone", tmp_path / "supervised"
    args = [WORKER, "--steps", "12", "--every", "4", "--sleep", "0"]
    subprocess.run([sys.executable, *args, "--dir", str(alone)], check=True, env=clean_env(), timeout=120,
                   capture_output=True)
    daemon = Daemon(supervised, args, ["--shared-memory"]).start()
    assert daemon.wait(120) == 0, daemon.stderr[-3000:]
    assert "from shared memory" in daemon.stderr  # the daemon committed them, not the worker
    assert committed_steps(alone) == committed_steps(supervised) == [4, 8, 12]
    for step in (4, 8, 12):
        name = f"ckpt-{step:012d}"
        a = json.loads((alone / name / "manifest.json").read_text())
        b = json.loads((supervised / name / "manifest.json").read_text())
        assert a["files"] == b["files"]  # names, sizes, checksums
        for key in ("step", "epoch", "reason", "framework", "metrics"):
            assert a[key] == b[key]
        for f in a["files"]:
            assert (alone / name / f["path"]).read_bytes() == (supervised / name / f["path"]).read_bytes()
        verify_ok(supervised, step)


@pytest.mark.parametrize("next_shared", [True, False], ids=["next-start-shared", "next-start-without"])
def test_no_segment_is_left_after_sigkill_of_the_worker_or_of_the_daemon(tmp_path, next_shared):
    run = tmp_path / "run"
    folder = folder_for(str(run))
    before = set(os.listdir(SHM_ROOT))
    options = ["--shared-memory", "--max-restarts", "10", *fast_backoff(tmp_path)]
    worker = [WORKER, "--steps", "100000", "--every", "3", "--sleep", "0.003"]
    daemon = Daemon(run, worker, options).start()
    first = daemon.worker_pid()
    wait_until(lambda: any(owner(n) == first for n in segments(folder)), 60)
    sizes = {n: v[2] for n, v in segments(folder).items()}
    os.kill(first, signal.SIGKILL)  # its segments cannot be removed by it
    second = daemon.worker_pid(other_than=first)
    wait_until(lambda: any(owner(n) == second for n in segments(folder)), 60)
    assert not [n for n in segments(folder) if owner(n) == first]
    time.sleep(0.5)  # several saves: the segments are reused, never grown, never more than two
    now = segments(folder)
    assert all(owner(n) == second for n in now), now  # the kept copy went once the second worker loaded it
    assert len(now) <= 2 and all(v[2] == sizes.get(n.replace(str(second), str(first)), v[2]) for n, v in now.items())
    daemon.kill()  # SIGKILL the daemon (and the worker): nothing is left to clean up but the next start
    assert os.listdir(folder)  # what a killed daemon leaves...
    # the next start cleans up whether or not it uses shared memory itself
    again = Daemon(run, [WORKER, "--steps", "1", "--every", "1000"],
                   options if next_shared else options[1:]).start()
    assert again.wait(120) == 0, again.stderr[-3000:]
    assert not os.path.exists(folder)  # ...the next daemon of the run removes (and the end of the run, its own)
    assert set(os.listdir(SHM_ROOT)) - before == set()


def progress_step(run: Path) -> int:
    (step,) = struct.unpack("<q", (run / ".savegame" / "progress").read_bytes()[:8])
    return step


def test_with_both_segments_waiting_for_the_daemon_the_worker_waits_and_loses_nothing(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "2", "--sleep", "0.003", "--keep-last", "100000"], ["--shared-memory"]).start()
    folder = folder_for(str(run))
    daemon.worker_pid()
    wait_until(lambda: len(committed_steps(run)) >= 2, 60)
    daemon.signal(signal.SIGSTOP)  # a daemon that cannot keep up (a slow disk): nothing is committed
    try:
        time.sleep(1.0)
        held = progress_step(run)
        time.sleep(0.5)
        assert progress_step(run) == held  # back-pressure: the worker waits for a free segment
        busy = segments(folder)
        assert len(busy) == 2 and all(status == Status.READY for status, _, _ in busy.values())
    finally:
        daemon.signal(signal.SIGCONT)
    wait_until(lambda: progress_step(run) > held + 20, 60)  # the daemon caught up: training goes on
    daemon.signal(signal.SIGTERM)  # an emergency stop: handed over, or written in-process if both are busy
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    assert "from shared memory" in daemon.stderr and "emergency checkpoint committed" in daemon.stderr
    steps = committed_steps(run)
    assert json.loads((run / f"ckpt-{max(steps):012d}" / "manifest.json").read_text())["reason"] == "emergency"
    last_even = max(s for s in steps if s % 2 == 0)
    assert set(range(2, last_even + 1, 2)) <= set(steps)  # every save committed, none lost while waiting
    verify_ok(run, max(steps))


def test_a_worker_whose_daemon_dies_with_its_hand_overs_pending_commits_them_itself(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "2", "--sleep", "0.003", "--keep-last", "100000"], ["--shared-memory"]).start()
    folder = folder_for(str(run))
    pid = daemon.worker_pid()
    wait_until(lambda: len(committed_steps(run)) >= 2, 60)
    daemon.signal(signal.SIGSTOP)
    wait_until(lambda: [v for v in segments(folder).values() if v[0] == Status.READY][1:], 30)
    pending = sorted(v[1] for v in segments(folder).values() if v[0] == Status.READY)
    daemon.signal(signal.SIGKILL)  # with two saves handed over and not committed
    daemon.proc.wait()
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", 60)
    steps = committed_steps(run)
    assert set(pending) <= set(steps)  # the worker wrote what the dead daemon had not
    last_even = max(s for s in steps if s % 2 == 0)
    assert set(range(2, last_even + 1, 2)) <= set(steps)
    for step in pending + [max(steps)]:
        verify_ok(run, step)
    last = json.loads((run / f"ckpt-{max(steps):012d}" / "manifest.json").read_text())
    assert last["reason"] == "emergency"  # and it stopped with an emergency checkpoint, written itself
    assert not os.path.exists(folder)  # nothing left in /dev/shm: its segments and the dead daemon's folder


def test_without_the_option_saves_are_written_by_the_worker_and_nothing_goes_to_dev_shm(tmp_path):
    """The hand-over is opt-in (--shared-memory): by default the worker writes its own saves and the
    daemon creates nothing in /dev/shm."""
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "8", "--every", "4", "--sleep", "0"]).start()
    assert daemon.wait(120) == 0, daemon.stderr[-3000:]
    assert "from shared memory" not in daemon.stderr
    assert committed_steps(run) == [4, 8]
    assert not os.path.lexists(folder_for(str(run)))


def kept_files(folder: str) -> list[str]:
    return [n for n in segments(folder) if owner(n) == -1]


def test_a_restart_after_a_kill_reads_its_checkpoint_from_shared_memory_then_lets_it_go(tmp_path):
    """Restore from RAM: the daemon keeps the dead worker's newest committed segment; the next worker
    resumes from it, checked against the checkpoint's manifest, and its memory goes back at once."""
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "4", "--sleep", "0.003"],
                    ["--shared-memory", *fast_backoff(tmp_path)]).start()
    folder = folder_for(str(run))
    first = daemon.worker_pid()
    step, _ = kill_when_handed_over(folder, first)
    wait_until(lambda: f"resumed {step} attempt 2\n" in daemon.stdout, 60)
    wait_until(lambda: f"loaded step {step} from the copy kept in shared memory" in daemon.stderr, 10)
    second = daemon.worker_pid(other_than=first)
    wait_until(lambda: not kept_files(folder) and all(owner(n) == second for n in segments(folder)), 10)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    verify_ok(run, step)


def test_a_damaged_copy_in_shared_memory_is_never_loaded_the_restart_reads_disk(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "slow.toml"
    config.write_text("backoff_initial = 3\nbackoff_max = 3\n")  # time to damage the kept copy
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "4", "--sleep", "0.003"],
                    ["--shared-memory", "--config", str(config)]).start()
    folder = folder_for(str(run))
    first = daemon.worker_pid()
    step, _ = kill_when_handed_over(folder, first)
    wait_until(lambda: kept_files(folder), 10)
    (name,) = kept_files(folder)
    with open(os.path.join(folder, name), "r+b") as f:  # one byte of the first tensor's data flipped
        header_length = struct.unpack("<Q", os.pread(f.fileno(), 8, 4096))[0]
        at = 4096 + 8 + header_length + 3
        os.pwrite(f.fileno(), bytes([os.pread(f.fileno(), 1, at)[0] ^ 0xFF]), at)
    wait_until(lambda: f"resumed {step} attempt 2\n" in daemon.stdout, 60)
    assert "kept in shared memory does not match its checkpoint" in daemon.stderr, daemon.stderr[-3000:]
    assert "from the copy kept in shared memory" not in daemon.stderr
    assert "could not load" not in daemon.stderr  # the checkpoint itself is fine: no fallback to an older one
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    verify_ok(run, step)


NEVER_RESTORES = """
import os, signal, sys, time
import numpy
import savegame
weights = numpy.zeros(1 << 18, dtype=numpy.float32)
ckpt = savegame.Checkpointer(every_steps=1)
ckpt.track(weights=weights)
ckpt.start_training()  # restore() is never called: every attempt starts fresh
for _ in range(3):
    weights += 1
    ckpt.step()
ckpt.flush()
if os.environ["SAVEGAME_ATTEMPT"] == "1":
    os.kill(os.getpid(), signal.SIGKILL)  # dies with its segments committed: the daemon keeps one
print("training", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
ckpt.finish()
"""


def test_a_worker_that_never_restores_does_not_keep_the_copy_in_shared_memory_alive(tmp_path):
    """A script that never calls restore() never says resumed or started: the kept copy must still go
    once it trains (its hello), or it would hold a third state-sized file beside the worker's two."""
    script, run, done = tmp_path / "never_restores.py", tmp_path / "run", tmp_path / "done"
    script.write_text(NEVER_RESTORES)
    daemon = Daemon(run, [str(script), str(done)], ["--shared-memory", *fast_backoff(tmp_path)]).start()
    folder = folder_for(str(run))
    wait_until(lambda: "training" in daemon.stdout, 60)
    try:
        wait_until(lambda: not kept_files(folder), 5)
    finally:
        done.touch()
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]


def test_after_a_killed_daemon_the_next_one_resumes_from_the_copy_in_shared_memory(tmp_path):
    """The same host, daemon and worker SIGKILLed (an OOM kill of the service, say): /dev/shm outlives
    them, and the next daemon's worker loads the newest checkpoint from RAM."""
    run = tmp_path / "run"
    options = ["--shared-memory", *fast_backoff(tmp_path)]
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "2", "--sleep", "0.5"], options).start()
    wait_until(lambda: "committed step 2 (periodic) from shared memory" in daemon.stderr, 60)
    daemon.kill()  # a second before the next save: the segment holding step 2 is COMMITTED, the other FREE
    assert committed_steps(run) == [2]
    again = Daemon(run, [WORKER, "--steps", "3", "--every", "1000", "--sleep", "0"], options).start()
    assert again.wait(120) == 0, again.stderr[-3000:]
    assert "resumed 2 attempt 1" in again.stdout
    assert "loaded step 2 from the copy kept in shared memory" in again.stderr, again.stderr[-3000:]
    assert not os.path.exists(folder_for(str(run)))


def with_fault(kind: str, trigger: Path, **extra: str) -> dict:
    """The environment that puts tests/faults/sitecustomize.py in the daemon and its worker."""
    path = os.pathsep.join(p for p in (str(TESTS / "faults"), os.environ.get("PYTHONPATH", "")) if p)
    return {"SAVEGAME_TEST_FAULT": str(trigger), "SAVEGAME_TEST_FAULT_KIND": kind, "PYTHONPATH": path, **extra}


def test_a_daemon_that_never_answers_does_not_hang_the_worker_which_commits_its_saves_itself(tmp_path):
    """The daemon cannot open the segments (out of file descriptors): they stay READY, unanswered.
    After ANSWER_TIMEOUT_S without a word the worker commits them itself and writes its later saves
    in-process (a daemon that could not take one will not take the next), and the run ends."""
    run, trigger = tmp_path / "run", tmp_path / "fault"
    trigger.touch()
    daemon = Daemon(run, [WORKER, "--steps", "12", "--every", "4", "--sleep", "0"], ["--shared-memory"],
                    env=with_fault("open-segment", trigger, SAVEGAME_TEST_ANSWER_TIMEOUT="0.5")).start()
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    assert "from shared memory" not in daemon.stderr  # not one committed by the daemon...
    # ...the first by the worker once it gave up waiting, the rest written in-process without waiting
    assert daemon.stderr.count("saving in this process from now on") == 1, daemon.stderr[-3000:]
    assert 1 <= daemon.stderr.count("no answer from the daemon") <= 2  # what the two segments held
    assert 1 <= daemon.stderr.count("dropped a snapshot hand-over") <= 2
    assert committed_steps(run) == [4, 8, 12]
    for step in (4, 8, 12):
        verify_ok(run, step)
    assert not os.path.exists(folder_for(str(run)))


def test_a_segment_whose_lock_is_held_is_never_taken_by_the_worker(tmp_path):
    """This test holds the lock of a READY segment, as the daemon does while it commits one: however
    long it takes, the worker waits (no double commit); once the lock is free it commits it itself."""
    run, trigger = tmp_path / "run", tmp_path / "fault"
    trigger.touch()  # the daemon never takes a segment: only this test and the worker do
    daemon = Daemon(run, [WORKER, "--steps", "8", "--every", "4", "--sleep", "0"], ["--shared-memory"],
                    env=with_fault("open-segment", trigger, SAVEGAME_TEST_ANSWER_TIMEOUT="1.5")).start()
    folder = folder_for(str(run))
    ready = wait_until(lambda: {v[1]: n for n, v in segments(folder).items() if v[0] == Status.READY}, 60)
    name = ready[min(ready)]  # the oldest hand-over: the one the worker tries first
    fd = os.open(os.path.join(folder, name), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # within the 1.5 s the worker waits before trying it
        time.sleep(5.0)  # three of the worker's time limits: without the lock it would have taken it by now
        assert committed_steps(run) == []
        assert segments(folder)[name][0] == Status.READY
        assert daemon.proc.poll() is None
    finally:
        os.close(fd)  # the lock goes with it
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    assert committed_steps(run) == [4, 8]
    for step in (4, 8):
        verify_ok(run, step)


def test_a_save_that_fails_to_render_into_its_segment_is_written_in_process(tmp_path):
    """The first render into a segment fails part-way (an I/O error): that save is not lost, the
    worker writes it itself, the same bytes as a worker on its own writes; later saves are handed over."""
    alone, supervised, trigger = tmp_path / "alone", tmp_path / "supervised", tmp_path / "fault"
    args = [WORKER, "--steps", "12", "--every", "4", "--sleep", "0"]
    subprocess.run([sys.executable, *args, "--dir", str(alone)], check=True, env=clean_env(), timeout=120,
                   capture_output=True)
    trigger.touch()
    daemon = Daemon(supervised, args, ["--shared-memory"], env=with_fault("render", trigger)).start()
    assert daemon.wait(120) == 0, daemon.stderr[-3000:]
    assert not trigger.exists()  # the fault fired (on the save of step 4)
    assert committed_steps(alone) == committed_steps(supervised) == [4, 8, 12], daemon.stderr[-3000:]
    assert "could not render step 4 into shared memory" in daemon.stderr
    assert "committed step 4 (periodic) from shared memory" not in daemon.stderr
    assert "committed step 8 (periodic) from shared memory" in daemon.stderr
    for step in (4, 8, 12):
        name = f"ckpt-{step:012d}"
        for f in json.loads((alone / name / "manifest.json").read_text())["files"]:
            assert (alone / name / f["path"]).read_bytes() == (supervised / name / f["path"]).read_bytes()
        verify_ok(supervised, step)


def notify_socket(tmp_path: Path) -> socket.socket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.05)
    return sock


def watchdog_pings_in_a_commit(sock: socket.socket, trigger: Path) -> int:
    """The WATCHDOG=1 pings the daemon sends in 2 s inside an injected 4-second commit."""
    messages: list[str] = []

    def collect() -> None:
        with contextlib.suppress(socket.timeout, BlockingIOError):
            while True:
                messages.append(sock.recv(4096).decode())

    wait_until(lambda: os.path.exists(f"{trigger}.committing"), 60)
    collect()
    before = sum("WATCHDOG=1" in m for m in messages)
    time.sleep(2.0)
    assert os.path.exists(f"{trigger}.committing")  # still inside that commit
    collect()
    return sum("WATCHDOG=1" in m for m in messages) - before


def test_a_long_commit_from_shared_memory_never_stalls_the_daemon_s_loop(tmp_path):
    """A hand-over of a big state to a slow disk takes long to commit; meanwhile the daemon's loop must
    go on: systemd's watchdog pings (a blocked loop past WatchdogSec gets the service killed),
    signals, events. The commits run beside the loop, and every one still lands."""
    sock = notify_socket(tmp_path)
    trigger = tmp_path / "slow"
    trigger.touch()
    env = with_fault("slow-commit", trigger, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", "4", "--sleep", "0.003"], ["--shared-memory"],
                    env=env).start()
    try:
        pings = watchdog_pings_in_a_commit(sock, trigger)  # inside the first 4-second commit
        assert pings >= 4, f"{pings} watchdog pings in 2 s of a commit: the commit blocks the daemon's loop"
        trigger.unlink()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    finally:
        daemon.kill()
        sock.close()
    steps = committed_steps(run)
    assert 4 in steps and "from shared memory" in daemon.stderr
    for step in steps:
        verify_ok(run, step)


def test_a_hand_over_left_unannounced_by_a_dead_worker_is_committed_beside_the_loop_too(tmp_path):
    """The worker is SIGKILLed the instant its segment is READY, before it sends the event: the
    daemon finds the segment when it sees the worker dead. That commit (4 s, injected) must not
    block the loop either: systemd's watchdog pings go on, and the restart resumes from that step."""
    sock = notify_socket(tmp_path)
    trigger, run = tmp_path / "slow", tmp_path / "run"
    trigger.touch()
    env = with_fault("unannounced", trigger, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="400000")
    daemon = Daemon(run, counter("--steps", 100000, "--every", 4, "--sleep", 0.01),
                    ["--shared-memory", *fast_backoff(tmp_path)], env=env).start()
    try:
        pings = watchdog_pings_in_a_commit(sock, trigger)  # inside the commit of the unannounced segment
        assert pings >= 4, f"{pings} watchdog pings in 2 s of committing a dead worker's segment"
        trigger.unlink()
        wait_until(lambda: "resumed from step 4" in daemon.stderr, 60)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    finally:
        daemon.kill()
        sock.close()
    assert "committed step 4 (periodic) from shared memory" in daemon.stderr, daemon.stderr[-3000:]
    verify_ok(run, 4)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_long_commit_past_the_hang_limit_does_not_spin_the_daemon_s_loop(tmp_path):
    """The worker dies while the daemon commits its hand-over (4 s, injected); once it has been silent
    past the hang limit, hang detection waits for the commit, and the loop must sleep meanwhile (a
    deadline already past made it poll without pause: a core spun for the rest of the commit)."""
    trigger, run = tmp_path / "slow", tmp_path / "run"
    trigger.touch()
    daemon = Daemon(run, counter("--steps", 100000, "--every", 4, "--sleep", 0.01),
                    ["--shared-memory", "--hang-timeout", "2.5", *fast_backoff(tmp_path)],
                    env=with_fault("slow-commit", trigger)).start()
    worker = daemon.worker_pid()
    wait_until(lambda: os.path.exists(f"{trigger}.committing"), 60)
    os.kill(worker, signal.SIGKILL)
    time.sleep(2.7)  # past the hang limit, inside the commit
    before = cpu_seconds(daemon.proc.pid)
    time.sleep(1.0)
    used = cpu_seconds(daemon.proc.pid) - before
    assert os.path.exists(f"{trigger}.committing")
    trigger.unlink()
    daemon.signal(signal.SIGTERM)
    daemon.wait(60)
    assert used < 0.3, f"the daemon used {used:.2f}s of CPU in 1s of waiting for a commit"
    assert "committed step 4 (periodic) from shared memory" in daemon.stderr, daemon.stderr[-3000:]


def spawn_with_pid(pid: int) -> Optional[subprocess.Popen]:
    """A `sleep` that gets process id `pid` (a recycled one), by setting the kernel's last pid; None
    where that cannot be done (not root, or another process took it first every time)."""
    for _ in range(50):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(["sleep", "60"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_a_dead_worker_s_recycled_pid_gets_no_signal_while_its_hand_over_is_committed(tmp_path):
    """A dead worker is handled once its hand-overs are committed; meanwhile its process id, already
    reaped, may go to another process. A stop (SIGTERM, then the grace's SIGKILL) in that time must
    not reach that process."""
    trigger, run = tmp_path / "slow", tmp_path / "run"
    trigger.touch()
    config = tmp_path / "grace.toml"
    config.write_text("grace = 0.5\n")
    daemon = Daemon(run, counter("--steps", 100000, "--every", 4, "--sleep", 0.01),
                    ["--shared-memory", "--config", str(config)], env=with_fault("slow-commit", trigger)).start()
    worker = daemon.worker_pid()
    wait_until(lambda: os.path.exists(f"{trigger}.committing"), 60)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{worker}"), 5)  # reaped by the daemon, its commit goes on
    impostor = spawn_with_pid(worker)
    if impostor is None:
        trigger.unlink()
        daemon.signal(signal.SIGTERM)
        daemon.wait(60)
        pytest.skip("cannot make a process of a given pid here (needs root)")
    try:
        daemon.signal(signal.SIGTERM)  # asks "the worker" for an emergency checkpoint; the grace then runs out
        time.sleep(1.5)
        assert os.path.exists(f"{trigger}.committing")  # still within the commit
        assert impostor.poll() is None, f"process {worker}, not the worker, got signal {-impostor.returncode}"
    finally:
        impostor.kill()
        impostor.wait()
        with contextlib.suppress(FileNotFoundError):
            trigger.unlink()
    daemon.wait(60)
    assert "committed step 4 (periodic) from shared memory" in daemon.stderr, daemon.stderr[-3000:]


MEMORY_WORKER = str(TESTS / "workers" / "memory_worker.py")


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_the_capture_copies_straight_into_the_segment_with_no_host_buffer_besides(tmp_path, framework):
    """A worker with a 64 MiB state saving 4 times, its peak RSS (VmHWM) over its RSS before the state
    existed: in-process about 2.1x the state (live + host buffer); handed over about 3.1x (live + two
    segments), which was 4.1x while the capture copied into host buffers first. Besides the segments
    (RssShmem) it holds the live state only: about 1.1x, against 2.1x then."""
    args = [MEMORY_WORKER, "--framework", framework, "--mb", "64"]
    alone = json.loads(subprocess.run([sys.executable, *args, "--dir", str(tmp_path / "alone")], check=True,
                                      env=clean_env(), capture_output=True, text=True, timeout=120).stdout.splitlines()[-1])
    daemon = Daemon(tmp_path / "run", args, ["--shared-memory"]).start()
    assert daemon.wait(120) == 0, daemon.stderr[-3000:]
    assert "committed step 1 (periodic) from shared memory" in daemon.stderr
    handed = json.loads(daemon.stdout.splitlines()[-1])
    state = handed["state"]
    assert handed["shmem"] >= 0.9 * state  # the segments it filled are in its RSS
    private = (handed["hwm"] - handed["shmem"] - handed["baseline"]) / state
    assert private < 1.5, handed
    extra = ((handed["hwm"] - handed["baseline"]) - (alone["hwm"] - alone["baseline"])) / state
    assert extra < 1.5, (handed, alone)  # at most two segments instead of a host buffer: ~1x, not 2x


def stop_with_both_segments_busy(tmp_path: Path, every: int, sleep: float, grace: int, wait_s: float = 0) -> Daemon:
    """A worker saving every `every` steps; every commit from shared memory takes 4 s more, so step
    N's segment stays READY while it commits and the next one's while it waits its turn: both busy.
    Then, `wait_s` later, a SIGTERM; the daemon has exited 0 and its emergency checkpoint is there."""
    trigger = tmp_path / "slow"
    trigger.touch()
    run = tmp_path / "run"
    daemon = Daemon(run, [WORKER, "--steps", "100000", "--every", str(every), "--sleep", str(sleep)],
                    ["--shared-memory", "--grace", str(grace)], env=with_fault("slow-commit", trigger)).start()
    folder = folder_for(str(run))
    wait_until(lambda: os.path.exists(f"{trigger}.committing"), 60)
    wait_until(lambda: sum(v[0] == Status.READY for v in segments(folder).values()) == 2, 10)
    time.sleep(wait_s)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    reasons = {json.loads((run / f"ckpt-{s:012d}" / "manifest.json").read_text())["reason"]
               for s in committed_steps(run)}
    assert "emergency" in reasons, daemon.stderr[-3000:]
    for step in committed_steps(run):
        verify_ok(run, step)
    return daemon


def test_an_emergency_save_never_queues_behind_two_slow_commits(tmp_path):
    """Both segments busy (one committing slowly, one waiting): a stop's emergency save must not wait
    for a segment past the grace period. It is written in-process, beside the daemon's commits."""
    stop_with_both_segments_busy(tmp_path, every=2, sleep=0.5, grace=2)


def test_a_stop_while_a_periodic_save_waits_for_a_segment_does_not_wait_out_the_grace(tmp_path):
    """Both segments busy with slow commits and the training thread waiting for one to copy its next
    periodic save into (the back-pressure rule): a stop must end that wait. The waiting save and the
    emergency save are written in-process within the grace period."""
    daemon = stop_with_both_segments_busy(tmp_path, every=1, sleep=0.05, grace=3, wait_s=0.5)
    # the worker left its two older hand-overs to the daemon and exited by itself, in time
    assert "grace period" not in daemon.stderr.split("asking the worker")[1], daemon.stderr[-3000:]


FAILING_EMERGENCY = """
import time
import numpy
import savegame
from savegame.worker import handover
write_checkpoint = handover.write_checkpoint

def failing(store, job):
    if job.reason == "emergency":  # written in-process (both segments busy): the disk is full by now
        time.sleep(5)  # meanwhile the daemon's commit of an older hand-over lands
        raise OSError(28, "No space left on device (injected)")
    return write_checkpoint(store, job)

handover.write_checkpoint = failing
weights = numpy.zeros(1 << 18, dtype=numpy.float32)
ckpt = savegame.Checkpointer(every_steps=2, keep_last=1000)
ckpt.track(weights=weights)
ckpt.restore()
ckpt.start_training()
while True:
    weights += 1
    ckpt.step()
    time.sleep(0.5)
"""


def test_an_emergency_save_that_fails_is_not_made_good_by_an_older_hand_over_the_daemon_commits(tmp_path):
    """Both segments busy with slow commits, a stop: the emergency save is written in-process and
    fails (a full disk); meanwhile the daemon commits an older hand-over. That older commit must not
    wipe out the failure: the worker exits 74, not 75, and the daemon does not report the emergency
    checkpoint as committed (exit 0)."""
    script, run, trigger = tmp_path / "failing_emergency.py", tmp_path / "run", tmp_path / "slow"
    script.write_text(FAILING_EMERGENCY)
    trigger.touch()
    daemon = Daemon(run, [str(script)], ["--shared-memory", "--grace", "30"],
                    env=with_fault("slow-commit", trigger)).start()
    folder = folder_for(str(run))
    wait_until(lambda: os.path.exists(f"{trigger}.committing"), 60)
    wait_until(lambda: sum(v[0] == Status.READY for v in segments(folder).values()) == 2, 10)
    daemon.signal(signal.SIGTERM)
    code = daemon.wait(90)
    assert "the emergency checkpoint" in daemon.stderr and "was not saved" in daemon.stderr, daemon.stderr[-3000:]
    assert "emergency checkpoint committed" not in daemon.stderr, daemon.stderr[-3000:]
    assert code == 74, daemon.stderr[-3000:]
    reasons = {json.loads((run / f"ckpt-{s:012d}" / "manifest.json").read_text())["reason"]
               for s in committed_steps(run)}
    assert "emergency" not in reasons


def test_a_stop_while_the_final_checkpoint_commits_ends_the_run_as_finished(tmp_path):
    """The worker ends its training and hands its final save over (a slow commit, 4 s); a SIGTERM
    comes meanwhile (finish() takes no stop). Training is done and its final checkpoint committed:
    the daemon exits 0, not 74 ("no emergency checkpoint: later work is lost")."""
    trigger, run = tmp_path / "slow", tmp_path / "run"
    trigger.touch()
    daemon = Daemon(run, [WORKER, "--steps", "3", "--every", "1000", "--sleep", "0"], ["--shared-memory"],
                    env=with_fault("slow-commit", trigger)).start()
    wait_until(lambda: os.path.exists(f"{trigger}.committing"), 60)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    assert "DONE 3" in daemon.stdout and "lost" not in daemon.stderr, daemon.stderr[-3000:]
    assert committed_steps(run) == [3]
    verify_ok(run, 3)
