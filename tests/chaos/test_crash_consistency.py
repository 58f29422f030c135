"""Crash consistency: a real process commits checkpoints in a loop and is SIGKILLed at random moments,
and at chosen ones (while writing a large file, just before and just after the rename, while
deleting, between payload and manifest on S3). Afterwards:
- every listed checkpoint verifies (no torn checkpoint is ever listed);
- every checkpoint the writer saw committed (and did not start deleting) is still listed;
- collect_garbage removes what the dead writers left behind.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.chaos

LOCAL_SEEDS = 60
S3_SEEDS = 8
LATER = time.time() + 10 * 24 * 3600

# The writer. It says what it is about to do on stdout (unbuffered) before doing it; `pause` makes it
# stop for a while at one point, so the kill lands exactly there.
WRITER = r"""
import json, os, random, sys, time
from savegame.storage import CheckpointStore

url, seed, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = json.loads(os.environ.get("CHAOS_STORAGE_OPTIONS", "null"))
rng = random.Random(seed)

def say(text):
    os.write(1, (text + "\n").encode())

real_rename = os.rename
def rename(src, dst, **dir_fds):
    if pause == "before-rename" and "ckpt-" in os.path.basename(dst):
        say("pause before-rename"); time.sleep(30)
    real_rename(src, dst, **dir_fds)
    if pause == "after-rename" and "ckpt-" in os.path.basename(dst):
        say("pause after-rename"); time.sleep(30)
os.rename = rename

store = CheckpointStore(url, options)
latest = store.latest()
step = (latest.step if latest else 0) + 1
chunk = os.urandom(1 << 20)
while True:
    say(f"begin {step}")
    with store.begin(step) as staged:
        for i in range(rng.randint(1, 4)):
            staged.write_bytes(f"shard{i}.bin", os.urandom(rng.randint(0, 200_000)))
        say(f"large {step}")
        with staged.open("model.bin") as f:
            for _ in range(rng.randint(4, 24)):
                f.write(chunk)
        if pause == "before-manifest":
            say("pause before-manifest"); time.sleep(30)
        say(f"commit {step}")
        staged.commit(epoch=step, metrics={"val_acc": rng.random()})
    say(f"committed {step}")
    for old in store.list()[:-4]:
        say(f"deleting {old.step}")
        store.delete(old.step)
    step += 1
"""


class Outcome:
    """What one killed writer said before it died."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines
        self.committed = {int(l.split()[1]) for l in lines if l.startswith("committed ")}
        self.deleting = {int(l.split()[1]) for l in lines if l.startswith("deleting ")}
        begun = [int(l.split()[1]) for l in lines if l.startswith("begin ")]
        self.last_begun = begun[-1] if begun else None


def start_writer(url: str, seed: int, pause: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, url, str(seed), pause], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(stream: IO[bytes], prefix: str, lines: list[str], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = stream.readline().decode().strip()
        if not line:
            raise AssertionError(f"the writer ended before {prefix!r}: {lines}")
        lines.append(line)
        if line.startswith(prefix):
            return
    raise AssertionError(f"no {prefix!r} within {timeout}s")


def kill_writer(url: str, seed: int, trigger: str, delay: float, env: dict) -> Outcome:
    """Start a writer, SIGKILL it `delay` seconds after it says `trigger` (or after it starts)."""
    proc = start_writer(url, seed, trigger if trigger.startswith(("before-", "after-")) else "none", env)
    lines: list[str] = []
    try:
        if trigger == "start":
            time.sleep(delay)
        else:
            prefix = "pause " if trigger.startswith(("before-", "after-")) else f"{trigger} "
            wait_for(proc.stdout, prefix, lines)
            time.sleep(delay)
        if proc.poll() is not None:
            raise AssertionError(f"the writer died on its own: {proc.stderr.read().decode()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        lines += proc.stdout.read().decode().splitlines()  # what it said before it died
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return Outcome(lines)


def check_store(store: CheckpointStore, must_have: set[int]) -> list[int]:
    """Every listed checkpoint verifies, and none that was committed is lost."""
    listed = store.list()
    steps = [c.step for c in listed]
    for info in listed:
        assert store.verify(info) == [], f"a torn checkpoint is listed: step {info.step}"
    assert must_have <= set(steps), f"committed checkpoints were lost: {sorted(must_have - set(steps))}"
    return steps


def plan_local_kills(rng: random.Random) -> list[tuple[str, float]]:
    fixed = ["before-rename", "after-rename", "large", "commit", "deleting"] * 4
    kills = [(t, rng.uniform(0, 0.004) if t != "large" else rng.uniform(0, 0.03)) for t in fixed]
    kills += [("start", rng.uniform(0.05, 0.6)) for _ in range(LOCAL_SEEDS - len(kills))]
    rng.shuffle(kills)
    return kills


def test_sigkill_on_local_disk(tmp_path: Path, savegame_env: dict):
    root = tmp_path / "run"
    store = CheckpointStore(str(root))
    rng = random.Random(20261126)
    committed: set[int] = set()
    left_staging = 0
    for seed, (trigger, delay) in enumerate(plan_local_kills(rng)):
        outcome = kill_writer(str(root), seed, trigger, delay, savegame_env)
        committed = (committed | outcome.committed) - outcome.deleting
        steps = check_store(store, committed)
        staging = list((root / ".staging").iterdir()) if (root / ".staging").exists() else []
        left_staging += bool(staging)
        if trigger == "before-rename":  # manifest written and synced, but not renamed: not a checkpoint
            assert staging, "a kill before the rename must leave the staging behind"
            assert outcome.last_begun not in steps
        if trigger == "after-rename":  # the rename is the commit, even if the writer never heard back
            assert outcome.last_begun in steps and outcome.last_begun not in outcome.committed
        if seed % 7 == 6:  # let some leftovers pile up across restarts before collecting
            removed = store.collect_garbage()  # the writers are dead: no need to wait for staleness
            assert len([r for r in removed if r.startswith(".staging/")]) == len(staging)
            assert not list((root / ".staging").iterdir())
            check_store(store, committed)
    assert left_staging >= 4  # the kills did land mid-save
    store.collect_garbage()
    assert not list((root / ".staging").iterdir())
    # half-deleted checkpoints (killed while deleting) go once stale, and nothing else does
    before = check_store(store, committed)
    store.collect_garbage(now=LATER)
    assert check_store(store, committed) == before
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("ckpt-")) == \
        [f"ckpt-{s:012d}" for s in before]
    assert before, "nothing was ever committed"


@pytest.fixture
def s3_env_for_writers(s3_server, savegame_env):
    import json

    return {**savegame_env, **s3_server.env, "CHAOS_STORAGE_OPTIONS": json.dumps(s3_server.storage_options)}


def test_sigkill_on_s3(s3_server, s3_env_for_writers: dict):
    url = f"s3://{s3_server.make_bucket()}/run"
    store = CheckpointStore(url, s3_server.storage_options)
    rng = random.Random(7)
    committed: set[int] = set()
    kills = [("large", rng.uniform(0, 0.05)), ("commit", 0.0), ("deleting", 0.0)] * 2
    kills += [("start", rng.uniform(0.4, 1.5)) for _ in range(S3_SEEDS - len(kills))]
    for seed, (trigger, delay) in enumerate(kills):
        outcome = kill_writer(url, seed, trigger, delay, s3_env_for_writers)
        committed = (committed | outcome.committed) - outcome.deleting
        check_store(store, committed)
    store.collect_garbage(now=LATER)
    steps = check_store(store, committed)
    assert steps and not store.scan().incomplete and not store.scan().damaged


def test_kill_between_payload_and_manifest_on_s3(s3_server, s3_env_for_writers: dict):
    url = f"s3://{s3_server.make_bucket()}/run"
    store = CheckpointStore(url, s3_server.storage_options)
    first = kill_writer(url, 1, "committed", 0.0, s3_env_for_writers)  # one good checkpoint first
    assert 1 in first.committed
    outcome = kill_writer(url, 2, "before-manifest", 0.0, s3_env_for_writers)
    torn = int([l for l in outcome.lines if l.startswith("large ")][-1].split()[1])
    assert torn not in outcome.committed
    assert check_store(store, first.committed)[-1] < torn  # the payload is there, but it is not listed
    assert torn in [p.step for p in store.scan().incomplete]
    assert store.collect_garbage() == []  # fresh, and the writer of an object store is unknowable
    assert store.collect_garbage(now=LATER) == [f"ckpt-{torn:012d}"]
    assert not store.scan().incomplete
    check_store(store, first.committed)
    # the next writer takes the step over cleanly
    nxt = kill_writer(url, 3, "committed", 0.0, s3_env_for_writers)
    assert torn in nxt.committed
    check_store(store, first.committed | nxt.committed)
