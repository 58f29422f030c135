"""Exact resume of the PyTorch MNIST example: real processes, real signals, bit-identical weights.

Every run trains the same short schedule (2 epochs of 40 batches, Adam, StepLR, shuffling
ResumableSampler, 2 DataLoader workers) and prints `final-weights-sha256`; an interrupted and
resumed run must end with the same hash as the uninterrupted reference run.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import psutil
import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.frameworks

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "pytorch_mnist_cnn.py"
BIN = Path(sys.executable).parent
STEPS = 80  # 2 epochs x 40 batches
ARGS = ["--epochs", "2", "--limit-batches", "40", "--batch-size", "32", "--num-workers", "2",
        "--optimizer", "adam", "--seed", "3", "--log-every", "1"]
HASH_RE = re.compile(r"^final-weights-sha256 ([0-9a-f]{64})$", re.M)
STEP_RE = re.compile(r"^step (\d+) ", re.M)
RESUMED_RE = re.compile(r"^resumed from step (\d+) ", re.M)
START_RE = re.compile(r"^(resumed from step \d+ |training from scratch$)")


class Proc:
    """A child process whose merged output is collected line by line on a thread."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                self._reader.join(5)
                if predicate():
                    return
                pytest.fail(f"process exited ({self.proc.returncode}) before {what}:\n{self.output[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}:\n{self.output[-3000:]}")
            time.sleep(0.005)

    def wait(self, timeout: float = 120) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.cmd[:3]} did not finish in {timeout}s:\n{self.output[-3000:]}")
        self._reader.join(10)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)

    def steps_since(self, index: int) -> list[int]:
        return [int(m.group(1)) for line in self.lines[index:] if (m := STEP_RE.match(line))]

    def final_hash(self) -> str:
        found = HASH_RE.findall(self.output)
        assert len(found) == 1, f"expected one final-weights-sha256 line:\n{self.output[-3000:]}"
        return found[0]


def example(env: dict[str, str], cwd: Path, run_dir: Optional[Path], *extra: str) -> Proc:
    cmd = [sys.executable, str(EXAMPLE), *ARGS, *extra]
    if run_dir is not None:
        cmd += ["--dir", str(run_dir)]
    return Proc(cmd, env, cwd)


def assert_contiguous_steps(proc: Proc, start: int, end: int) -> None:
    """The steps this attempt printed are start+1 .. end, none repeated nor skipped."""
    steps = proc.steps_since(0)
    assert steps == list(range(start + 1, end + 1)), f"steps {steps[:3]}..{steps[-3:]}, expected {start + 1}..{end}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The uninterrupted run's final hash (no periodic saves: saving must not change training)."""
    env = _clean_env()
    where = tmp_path_factory.mktemp("reference")
    proc = example(env, where, where / "ckpt")
    assert proc.wait() == 0, proc.output[-3000:]
    assert_contiguous_steps(proc, 0, STEPS)
    return proc.final_hash()


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _rng() -> tuple[random.Random, int]:
    seed = int(os.environ.get("SAVEGAME_TEST_SEED") or random.randrange(1 << 30))
    return random.Random(seed), seed


def _stop_at(proc: Proc, target: int, sig: int = signal.SIGTERM) -> None:
    proc.wait_for(f"step {target}", lambda: any(s >= target for s in proc.steps_since(0)))
    os.kill(proc.pid, sig)


def test_sigterm_at_random_steps_then_resume_is_bit_identical(tmp_path: Path, reference: str) -> None:
    rng, seed = _rng()
    env, run_dir = _clean_env(), tmp_path / "ckpt"
    first, second = rng.randrange(3, 36), rng.randrange(42, 70)  # one mid-epoch stop in each epoch
    why = f"(SAVEGAME_TEST_SEED={seed}, stops after steps {first} and {second})"
    resumed_from = 0
    for target in (first, second):
        proc = example(env, tmp_path, run_dir, "--save-every-steps", "11")
        _stop_at(proc, target)
        assert proc.wait() == 75, f"{why}\n{proc.output[-3000:]}"
        latest = CheckpointStore(str(run_dir)).latest()
        assert latest is not None and latest.reason == "emergency", why
        assert target <= latest.step <= STEPS, why
        assert latest.manifest.resumed_from == (resumed_from or None), why
        if resumed_from:
            assert RESUMED_RE.search(proc.output).group(1) == str(resumed_from), why  # type: ignore[union-attr]
        assert_contiguous_steps(proc, resumed_from, latest.step)
        resumed_from = latest.step
    last = example(env, tmp_path, run_dir, "--save-every-steps", "11")
    assert last.wait() == 0, f"{why}\n{last.output[-3000:]}"
    assert_contiguous_steps(last, resumed_from, STEPS)
    assert last.final_hash() == reference, f"resumed run diverged from the uninterrupted one {why}"


def _dataloader_workers(pid: int) -> list[psutil.Process]:
    return [c for c in psutil.Process(pid).children() if c.status() != psutil.STATUS_ZOMBIE]


def _committed_emergency(run_dir: Path) -> Optional[int]:
    for folder in sorted(run_dir.glob("ckpt-*"), reverse=True):
        try:
            manifest = json.loads((folder / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("reason") == "emergency":
            return int(manifest["step"])
    return None


@pytest.mark.parametrize("to_group", [False, True], ids=["worker-main-only", "whole-process-group"])
def test_emergency_save_with_dataloader_workers_running(tmp_path: Path, to_group: bool) -> None:
    """SIGTERM (to the main process, as the daemon sends it; or to the whole group, as systemd's
    KillMode=control-group or `kill -TERM -PGID` do) mid-epoch with 2 DataLoader workers: the
    workers stay alive while the emergency checkpoint is written, the run exits 75, and it resumes."""
    rng, seed = _rng()
    env, run_dir = _clean_env(), tmp_path / "ckpt"
    target = rng.randrange(3, 16)  # well before the epoch ends and the workers are shut down
    proc = example(env, tmp_path, run_dir)
    proc.wait_for(f"step {target}", lambda: any(s >= target for s in proc.steps_since(0)))
    workers = _dataloader_workers(proc.pid)
    assert len(workers) == 2, f"expected 2 DataLoader workers, found {workers}"
    (os.killpg if to_group else os.kill)(proc.pid, signal.SIGTERM)
    polls_alive_before_commit = 0
    while _committed_emergency(run_dir) is None and proc.proc.poll() is None:
        if all(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
            polls_alive_before_commit += 1
        else:
            pytest.fail(f"a DataLoader worker died before the emergency checkpoint was committed (seed {seed})")
        time.sleep(0.001)
    rc = proc.wait()
    assert rc == 75, f"seed {seed}\n{proc.output[-3000:]}"
    assert "killed by signal" not in proc.output and "exited unexpectedly" not in proc.output, proc.output[-3000:]
    step = _committed_emergency(run_dir)
    assert step is not None and target <= step < STEPS
    assert polls_alive_before_commit > 0, "never saw the workers between the stop request and the commit"
    resumed = example(env, tmp_path, run_dir, "--epochs", "1")
    assert resumed.wait() == 0, resumed.output[-3000:]
    assert f"resumed from step {step} " in resumed.output
    assert_contiguous_steps(resumed, step, STEPS // 2)


# -- under the daemon -------------------------------------------------------------------------------

def _daemon_broken(env: dict[str, str], tmp_path: Path) -> Optional[str]:
    """Why `savegame run` does not work (None when it does): a broken daemon fails this test."""
    exe = BIN / "savegame"
    if not exe.exists():
        return "no savegame executable"
    probe = subprocess.run([str(exe), "run", "--dir", str(tmp_path / "probe"), "--", sys.executable, "-c", "pass"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        return f"`savegame run` exited {probe.returncode}: {probe.stderr.strip()[-500:]}"
    return None


def _worker_pid(daemon: Proc) -> Optional[int]:
    try:
        children = psutil.Process(daemon.pid).children()
    except psutil.NoSuchProcess:
        return None
    live = [c for c in children if c.status() != psutil.STATUS_ZOMBIE]
    return live[0].pid if len(live) == 1 else None


@pytest.mark.chaos
@pytest.mark.timeout(240)
def test_sigkills_and_daemon_sigterm_under_savegame_run_are_bit_identical(tmp_path: Path, reference: str) -> None:
    env = _clean_env()
    broken = _daemon_broken(env, tmp_path)
    assert broken is None, broken
    rng, seed = _rng()
    kills = sorted(rng.sample(range(4, 60), 3))
    stop_after = rng.randrange(max(kills) + 3, 70)
    why = f"(SAVEGAME_TEST_SEED={seed}, SIGKILLs after steps {kills}, SIGTERM after {stop_after})"
    run_dir = tmp_path / "run"
    command = [sys.executable, str(EXAMPLE), *ARGS, "--save-every-steps", "5"]
    daemon = Proc([str(BIN / "savegame"), "run", "--dir", str(run_dir), "--grace", "60", "--max-restarts", "10",
                   "--", *command], env, tmp_path)
    try:
        for target in [*kills, stop_after]:
            daemon.wait_for(f"a worker to start {why}", lambda: _attempt_start(daemon) >= 0, timeout=60)
            mark = _attempt_start(daemon)
            daemon.wait_for(f"worker step {target} {why}",
                            lambda t=target, m=mark: any(s >= t for s in daemon.steps_since(m)), timeout=90)
            pid = _worker_pid(daemon)
            assert pid is not None, f"cannot find the worker process {why}"
            if target != stop_after:
                os.kill(pid, signal.SIGKILL)
                daemon.wait_for(f"a new worker after SIGKILL {why}",
                                lambda m=mark, old=pid: (_attempt_start(daemon) > m
                                                         and _worker_pid(daemon) not in (None, old)),
                                timeout=60)
        os.kill(daemon.pid, signal.SIGTERM)
        rc = daemon.wait(90)
        assert rc == 0, f"the daemon must exit 0 after a clean emergency stop {why}\n{daemon.output[-3000:]}"
    finally:
        if daemon.proc.poll() is None:
            daemon.kill()
    latest = CheckpointStore(str(run_dir)).latest()
    assert latest is not None and latest.reason == "emergency" and latest.step >= stop_after, why
    assert "final-weights-sha256" not in daemon.output, why
    again = Proc([str(BIN / "savegame"), "run", "--dir", str(run_dir), "--", *command], env, tmp_path)
    assert again.wait(120) == 0, f"{why}\n{again.output[-3000:]}"
    assert RESUMED_RE.search(again.output).group(1) == str(latest.step), why  # type: ignore[union-attr]
    assert again.final_hash() == reference, f"the supervised run diverged from the uninterrupted one {why}"


def _attempt_start(daemon: Proc) -> int:
    """Index of the line where the current worker attempt's output starts."""
    for i in range(len(daemon.lines) - 1, -1, -1):
        if START_RE.match(daemon.lines[i]):
            return i
    return -1
