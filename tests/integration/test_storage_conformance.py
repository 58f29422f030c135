"""One conformance suite every storage backend runs: local disk, memory://, and a real S3 server.

Each test gets a fresh run root. `Backend` gives raw access to that root (bypassing the store), to
damage, inspect and spy on it.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import fsspec
import pytest

from savegame.errors import CheckpointExists, CheckpointNotFound, CorruptCheckpoint, StorageError
from savegame.storage import CheckpointStore, copy_checkpoint
from savegame.storage import local as local_backend_module

pytestmark = pytest.mark.integration

BIG = os.urandom(3 << 20) + b"tail"  # written 1 MiB at a time: large and small writes, an odd size
FILES = {"model.bin": BIG, "optim/state.bin": b"optimizer" * 1000, "empty.bin": b""}
LATER = time.time() + 10 * 24 * 3600  # "now", ten days on: every leftover is stale by then


class Backend:
    """A fresh run root on one kind of storage, and raw access to it."""

    def __init__(self, kind: str, url: str, fs: Any, root: str, storage_options: dict | None) -> None:
        self.kind, self.url, self.fs, self.root, self.storage_options = kind, url, fs, root, storage_options

    def store(self) -> CheckpointStore:
        return CheckpointStore(self.url, self.storage_options)

    def separate_store(self) -> CheckpointStore:
        """A store with its own filesystem object and caches, as another process would have."""
        if self.kind == "s3":
            return CheckpointStore(self.url, {**self.storage_options, "skip_instance_cache": True})
        return self.store()

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def write_raw(self, rel: str, data: bytes) -> None:
        if self.kind == "local":
            self.fs.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
        self.fs.pipe_file(self.path(rel), data)

    def read_raw(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def remove_raw(self, rel: str) -> None:
        self.fs.rm_file(self.path(rel))

    def files(self) -> set[str]:
        """Every file under the run root, relative to it."""
        self.fs.invalidate_cache()
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        prefix = self.root.rstrip("/") + "/"
        return {p[len(prefix):] for p in found if p.startswith(prefix)}

    def spy_reads(self, monkeypatch: pytest.MonkeyPatch, store: CheckpointStore) -> list[str]:
        """Record every path the store opens or reads from now on."""
        seen: list[str] = []
        if self.kind == "local":
            real_open, real_os_open = open, os.open

            def spy_open(file, *args, **kwargs):
                seen.append(str(file))
                return real_open(file, *args, **kwargs)

            def spy_os_open(path, flags, *args, **kwargs):
                if not flags & os.O_DIRECTORY:  # files, not the folders walked on the way
                    seen.append(str(path))
                return real_os_open(path, flags, *args, **kwargs)

            monkeypatch.setattr(local_backend_module, "open", spy_open, raising=False)
            monkeypatch.setattr(os, "open", spy_os_open)
            return seen
        fs = store._backend.fs
        for name in ("open", "cat", "cat_file", "_cat_file", "cat_ranges", "_cat_ranges", "get_file"):
            real = getattr(fs, name, None)
            if real is not None:
                monkeypatch.setattr(fs, name, _recording(real, seen))
        return seen

    def break_bulk_removal(self, monkeypatch: pytest.MonkeyPatch, store: CheckpointStore) -> None:
        """Make removing a folder's payload fail, as a crash in the middle of a delete would."""
        def boom(*args: Any, **kwargs: Any) -> None:
            raise OSError(5, "simulated failure while removing the payload")

        if self.kind == "local":
            monkeypatch.setattr(shutil, "rmtree", boom)
        else:
            monkeypatch.setattr(store._backend.fs, "rm", boom)


def _recording(real: Callable, seen: list[str]) -> Callable:
    import asyncio

    def note(path: Any) -> None:
        seen.extend(str(p) for p in (path if isinstance(path, (list, tuple)) else [path]))

    if asyncio.iscoroutinefunction(real):
        async def spy_async(path, *args, **kwargs):
            note(path)
            return await real(path, *args, **kwargs)
        return spy_async

    def spy(path, *args, **kwargs):
        note(path)
        return real(path, *args, **kwargs)
    return spy


@pytest.fixture(params=["local", "memory", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path):
    kind = request.param
    if kind == "local":
        root = tmp_path / "run"
        yield Backend(kind, str(root), fsspec.filesystem("file"), str(root), None)
    elif kind == "memory":
        name = f"conformance-{uuid.uuid4().hex}"
        fs = fsspec.filesystem("memory")
        yield Backend(kind, f"memory://{name}/run", fs, f"/{name}/run", None)
        if fs.exists(f"/{name}"):  # a test may leave nothing behind
            fs.rm(f"/{name}", recursive=True)
    else:
        import s3fs

        server = request.getfixturevalue("s3_server")
        bucket = server.make_bucket()
        fs = s3fs.S3FileSystem(**server.storage_options, skip_instance_cache=True)
        yield Backend(kind, f"s3://{bucket}/run", fs, f"{bucket}/run", server.storage_options)


@pytest.fixture
def local_peer(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(str(tmp_path / "peer"))


def save(store: CheckpointStore, step: int, files: dict[str, bytes] = FILES, **commit: Any):
    with store.begin(step) as staged:
        for rel, data in files.items():
            with staged.open(rel) as f:
                for start in range(0, max(len(data), 1), 1 << 20):  # several writes per file
                    f.write(data[start:start + (1 << 20)])
        return staged.commit(**{"epoch": step // 10, "metrics": {"val_acc": step / 1000}, **commit})


def read_all(store: CheckpointStore, info) -> dict[str, bytes]:
    out = {}
    for entry in info.manifest.files:
        with store.open_file(info, entry.path) as f:
            out[entry.path] = f.read()
    return out


# ---------------------------------------------------------------- commit, list, verify

def test_begin_write_commit(backend: Backend):
    store = backend.store()
    info = save(store, 1200, reason="best", framework="torch", run_id="r1", resumed_from=900)
    assert info.step == 1200 and info.epoch == 120 and info.reason == "best"
    assert info.name == "ckpt-000000001200"
    assert info.path.endswith("/run/ckpt-000000001200")
    assert info.bytes == sum(len(d) for d in FILES.values())
    assert {f.path: f.bytes for f in info.manifest.files} == {k: len(v) for k, v in FILES.items()}
    assert all(f.checksum.startswith("xxh3-128:") for f in info.manifest.files)
    listed = store.list()
    assert [c.manifest for c in listed] == [info.manifest]
    assert listed[0].path == info.path
    assert store.verify(listed[0]) == []
    assert read_all(store, listed[0]) == FILES
    assert {f for f in backend.files() if f.startswith("ckpt-")} == \
        {f"ckpt-000000001200/{name}" for name in [*FILES, "manifest.json"]}


def test_nothing_is_visible_before_commit(backend: Backend):
    store = backend.store()
    staged = store.begin(5)
    staged.write_bytes("model.bin", b"x" * 1000)
    assert store.list() == [] and store.latest() is None
    with pytest.raises(CheckpointNotFound):
        store.get(5)
    staged.commit()
    assert [c.step for c in store.list()] == [5]


def test_list_is_committed_only_and_sorted_by_step(backend: Backend):
    store = backend.store()
    for step in (30, 5, 1000, 12):
        save(store, step, {"w.bin": bytes([step % 256]) * 10})
    pending = store.begin(7)
    pending.write_bytes("w.bin", b"never committed")
    assert [c.step for c in store.list()] == [5, 12, 30, 1000]
    assert store.latest().step == 1000 and store.get(12).step == 12
    with pytest.raises(CheckpointNotFound, match="step 7"):
        store.get(7)
    backend.write_raw("not-a-checkpoint/manifest.json", b"{}")
    backend.write_raw("ckpt-12/manifest.json", b"{}")  # not 12 digits
    assert [c.step for c in store.list()] == [5, 12, 30, 1000]


def test_another_writers_commit_becomes_visible(backend: Backend):
    """A reader that listed a save in progress sees it once another process commits it."""
    reader, writer = backend.store(), backend.separate_store()
    save(reader, 1)
    staged = writer.begin(2)
    staged.write_bytes("model.bin", BIG)
    assert [c.step for c in reader.list()] == [1]
    assert not reader.scan().damaged
    staged.commit(epoch=7)
    assert [c.step for c in reader.list()] == [1, 2]
    assert not reader.scan().damaged
    assert reader.get(2).epoch == 7 and reader.verify(reader.get(2)) == []
    with pytest.raises(CheckpointExists):
        reader.begin(2)
    writer.delete(1)
    assert [c.step for c in reader.list()] == [2]


def test_list_reads_manifests_only(backend: Backend, monkeypatch: pytest.MonkeyPatch):
    store = backend.store()
    for step in (1, 2, 3):
        save(store, step)
    fresh = backend.store()
    seen = backend.spy_reads(monkeypatch, fresh)
    assert [c.step for c in fresh.list()] == [1, 2, 3]
    assert seen, "the spy saw nothing: the listing must read the manifests somehow"
    assert all(p.endswith("manifest.json") for p in seen), seen


@pytest.mark.parametrize("damage, problem", [
    ("truncate", "truncated"), ("flip", "checksum mismatch"), ("remove", "missing"), ("grow", "grown"),
])
def test_verify_finds_damage(backend: Backend, damage: str, problem: str):
    store = backend.store()
    save(store, 1)
    info = save(store, 2)
    rel = "ckpt-000000000002/model.bin"
    if damage == "truncate":
        backend.write_raw(rel, BIG[:-1])
    elif damage == "flip":
        altered = bytearray(BIG)
        altered[len(BIG) // 2] ^= 0x01
        backend.write_raw(rel, bytes(altered))
    elif damage == "grow":
        backend.write_raw(rel, BIG + b"!")
    else:
        backend.remove_raw(rel)
    problems = store.verify(store.get(2))
    assert len(problems) == 1 and problems[0].startswith("model.bin: ") and problem in problems[0]
    assert store.verify(store.get(1)) == []
    assert info.step in [c.step for c in store.list()]  # listing does not read payloads: still listed


# ---------------------------------------------------------------- delete, quarantine, garbage

def test_delete(backend: Backend):
    store = backend.store()
    for step in (1, 2, 3):
        save(store, step)
    store.delete(2)
    assert [c.step for c in store.list()] == [1, 3]
    assert not any(f.startswith("ckpt-000000000002") for f in backend.files())
    store.delete(2)  # already gone: nothing to do
    assert all(store.verify(c) == [] for c in store.list())


def test_delete_removes_the_manifest_first(backend: Backend, monkeypatch: pytest.MonkeyPatch):
    store = backend.store()
    for step in (1, 2):
        save(store, step)
    backend.break_bulk_removal(monkeypatch, store)
    with pytest.raises(StorageError):
        store.delete(1)
    monkeypatch.undo()
    left = {f for f in backend.files() if f.startswith("ckpt-000000000001/")}
    assert "ckpt-000000000001/manifest.json" not in left  # the manifest went first ...
    assert "ckpt-000000000001/model.bin" in left  # ... and the crash left the payload
    assert [c.step for c in store.list()] == [2]  # a half-deleted checkpoint is never listed
    assert [p.step for p in store.scan().incomplete] == [1]
    assert store.collect_garbage(now=LATER)  # the leftover is garbage, collected once stale
    assert not any(f.startswith("ckpt-000000000001") for f in backend.files())
    assert [c.step for c in store.list()] == [2] and store.verify(store.get(2)) == []


def test_quarantine(backend: Backend):
    store = backend.store()
    for step in (1, 2, 3):
        save(store, step)
    store.quarantine(2, "checksum mismatch in model.bin")
    assert [c.step for c in store.list()] == [1, 3]
    assert [p.step for p in store.scan().quarantined] == [2]
    assert store.collect_garbage(now=LATER) == []  # quarantined is not garbage
    assert [p.step for p in store.scan().quarantined] == [2]
    assert [c.step for c in store.list()] == [1, 3]


def test_collect_garbage_of_stale_staging(backend: Backend):
    store = backend.store()
    save(store, 1)
    abandoned = store.begin(2)
    abandoned.write_bytes("model.bin", b"half a checkpoint")
    before = backend.files()
    assert store.collect_garbage() == []  # fresh, and its writer (this process) is alive
    assert backend.files() == before
    removed = store.collect_garbage(now=LATER)
    assert len(removed) == 1
    assert {f for f in backend.files() if not f.startswith("ckpt-000000000001/")} == set()
    assert [c.step for c in store.list()] == [1] and store.verify(store.get(1)) == []
    # the step is free again
    save(store, 2)
    assert [c.step for c in store.list()] == [1, 2]


def test_abort_leaves_nothing(backend: Backend):
    store = backend.store()
    save(store, 1)
    before = {f for f in backend.files() if not f.startswith(".staging/")}
    with pytest.raises(RuntimeError):
        with store.begin(2) as staged:
            staged.write_bytes("model.bin", b"x" * 1000)
            raise RuntimeError("the training script failed mid-save")
    assert {f for f in backend.files() if not f.startswith(".staging/")} == before
    assert not [f for f in backend.files() if f.startswith(".staging/")]
    assert [c.step for c in store.list()] == [1]


# ---------------------------------------------------------------- the same step twice

def test_second_commit_of_a_step_is_refused(backend: Backend):
    store = backend.store()
    first = save(store, 5)
    with pytest.raises(CheckpointExists):
        save(store, 5, {"model.bin": b"another state"})
    assert [c.manifest for c in store.list()] == [first.manifest]
    assert store.verify(store.get(5)) == [] and read_all(store, store.get(5)) == FILES


def test_racing_commits_of_one_step_keep_the_winner(backend: Backend):
    """Two writers of one step (say, a retried save): the loser fails, the winner stays whole.

    Local disk stages each writer apart and the rename decides; object stores (no rename, one set of
    keys) decide when the second writer begins, before it could overwrite the winner's payload.
    """
    store = backend.store()
    winner = store.begin(5)
    try:
        loser = store.begin(5)
    except CheckpointExists:
        assert backend.kind != "local"
        loser = None
    winner.write_bytes("model.bin", BIG)
    winner.commit(reason="emergency")
    if loser is not None:
        loser.write_bytes("model.bin", BIG[::-1])
        with pytest.raises(CheckpointExists):
            loser.commit(reason="periodic")
    info = store.get(5)
    assert info.reason == "emergency"
    assert store.verify(info) == [] and read_all(store, info)["model.bin"] == BIG
    assert not any(".savegame-writer" in f for f in backend.files())  # the claim goes once committed


RACER = r"""
import json, os, sys
from savegame.errors import CheckpointExists
from savegame.storage import CheckpointStore

url, tag = sys.argv[1], sys.argv[2]
store = CheckpointStore(url, json.loads(os.environ["RACE_STORAGE_OPTIONS"]))
staged = None
print("ready", flush=True)
for line in sys.stdin:
    command, step = line.split()
    try:
        if command in ("begin", "all"):
            staged = store.begin(int(step))
        if command in ("write", "all"):
            staged.write_bytes("model.bin", f"{tag}:{step}:".encode() * 300_000)  # differs per writer
        if command in ("commit", "all"):
            staged.commit(run_id=tag)
            staged = None
            print("won", flush=True)
            continue
        print("ok", flush=True)
    except CheckpointExists as exc:
        if staged is not None:
            staged.abort()
        staged = None
        print("lost", str(exc).replace(chr(10), " "), flush=True)
"""


class Racer:
    """A writer in its own process, driven one command at a time."""

    def __init__(self, url: str, tag: str, env: dict) -> None:
        import subprocess
        import sys

        self.tag = tag
        self.proc = subprocess.Popen([sys.executable, "-c", RACER, url, tag], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout.readline().strip() == "ready"

    def send(self, command: str, step: int) -> None:
        self.proc.stdin.write(f"{command} {step}\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        line = self.proc.stdout.readline()
        assert line, "the writer died"
        return line.split()[0]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture
def bucket(s3_server) -> str:
    return f"s3://{s3_server.make_bucket()}/run"


@pytest.fixture
def racers(bucket: str, s3_server, savegame_env):
    import json

    env = {**savegame_env, "RACE_STORAGE_OPTIONS": json.dumps(s3_server.storage_options)}
    pair = [Racer(bucket, tag, env) for tag in ("alpha", "beta")]
    yield pair
    for racer in pair:
        racer.close()


def assert_one_winner(store: CheckpointStore, step: int, answers: dict[str, str]) -> None:
    assert sorted(answers.values()) == ["lost", "won"], answers
    info = store.get(step)
    winner = next(tag for tag, answer in answers.items() if answer == "won")
    assert info.manifest.run_id == winner
    assert store.verify(info) == [], "the loser overwrote the winner's payload"
    assert read_all(store, info)["model.bin"] == f"{winner}:{step}:".encode() * 300_000


def test_processes_racing_for_one_step_on_a_bucket(bucket: str, s3_server, racers):
    """Two real processes write the same step to the S3 server: the worst interleaving (both write
    their payload before either commits), then truly at once, several times. (Local disk: the
    rename decides, see the test above.)"""
    alpha, beta = racers
    store = CheckpointStore(bucket, {**s3_server.storage_options, "skip_instance_cache": True})
    answers = {}
    for racer in (alpha, beta):
        racer.send("begin", 5)
        answers[racer.tag] = racer.answer()
    for racer in (alpha, beta):
        if answers[racer.tag] == "ok":
            racer.send("write", 5)
            racer.answer()
    for racer in (alpha, beta):
        if answers[racer.tag] == "ok":
            racer.send("commit", 5)
            answers[racer.tag] = racer.answer()
    assert_one_winner(store, 5, answers)
    for step in range(6, 16):
        for racer in (alpha, beta):
            racer.send("all", step)
        assert_one_winner(store, step, {racer.tag: racer.answer() for racer in (alpha, beta)})
    assert not store.scan().incomplete and not store.scan().damaged


def test_a_claim_left_by_a_dead_writer(backend: Backend):
    """Object stores: a dead writer's claim on this host is taken over at once; one from another host
    holds the step until it is collected as stale."""
    import json
    import socket
    import subprocess
    import sys

    if backend.kind == "local":
        pytest.skip("local disk stages each writer apart: no claims")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store = backend.store()
    claim = "ckpt-000000000005/.savegame-writer.json"
    backend.write_raw(claim, json.dumps({"host": socket.gethostname(), "pid": dead.pid}).encode())
    save(store, 5)
    assert [c.step for c in store.list()] == [5] and store.verify(store.get(5)) == []
    backend.write_raw("ckpt-000000000006/model.bin", b"half")
    backend.write_raw("ckpt-000000000006/.savegame-writer.json", json.dumps({"host": "elsewhere", "pid": 7}).encode())
    with pytest.raises(CheckpointExists, match=r"another writer is saving this step \(elsewhere, pid 7\)"):
        store.begin(6)
    assert store.collect_garbage(now=LATER) == ["ckpt-000000000006"]
    save(store, 6)
    assert [c.step for c in store.list()] == [5, 6]


# ---------------------------------------------------------------- copy between tiers

def assert_same_checkpoint(src: CheckpointStore, a, dst: CheckpointStore, b) -> None:
    assert b.manifest == a.manifest  # step, epoch, reason, metrics, created, checksums
    assert dst.verify(b) == []
    assert read_all(dst, b) == read_all(src, a) == FILES


def test_copy_to_and_from_local(backend: Backend, local_peer: CheckpointStore):
    store = backend.store()
    here = save(store, 100, reason="best")
    there = copy_checkpoint(store, here, local_peer)
    assert [c.step for c in local_peer.list()] == [100]
    assert_same_checkpoint(store, here, local_peer, local_peer.get(100))

    local_only = save(local_peer, 200, reason="emergency")
    back = copy_checkpoint(local_peer, local_only, store)
    assert [c.step for c in store.list()] == [100, 200]
    assert back.path == store.get(200).path
    assert_same_checkpoint(local_peer, local_only, store, store.get(200))
    with pytest.raises(CheckpointExists):
        copy_checkpoint(local_peer, there, store)


def test_a_damaged_source_is_never_copied(backend: Backend, local_peer: CheckpointStore):
    store = backend.store()
    info = save(store, 100)
    altered = bytearray(BIG)
    altered[12345] ^= 0xFF  # same size: only the checksum can tell
    backend.write_raw("ckpt-000000000100/model.bin", bytes(altered))
    with pytest.raises(CorruptCheckpoint, match="model.bin does not match its manifest"):
        copy_checkpoint(store, info, local_peer)
    assert local_peer.list() == []
    peer_root = Path(local_peer.location.path)
    assert not [p for p in peer_root.rglob("*") if p.is_file()]  # not even staging left

    # and the other way: a damaged local checkpoint never reaches this backend
    good = save(local_peer, 300)
    (peer_root / "ckpt-000000000300" / "optim" / "state.bin").write_bytes(b"X" * len(FILES["optim/state.bin"]))
    with pytest.raises(CorruptCheckpoint):
        copy_checkpoint(local_peer, good, store)
    assert [c.step for c in store.list()] == [100]
    assert not [f for f in backend.files() if "000000000300" in f]


def test_store_errors_are_storage_errors(backend: Backend, tmp_path: Path):
    if backend.kind == "local":
        blocker = tmp_path / "file-not-folder"
        blocker.write_bytes(b"")
        store = CheckpointStore(str(blocker / "run"))
        with pytest.raises(StorageError):
            save(store, 1)
    else:
        store = backend.store()
        save(store, 1)
        backend.remove_raw("ckpt-000000000001/model.bin")
        with pytest.raises(StorageError):
            read_all(store, store.get(1))
    assert issubclass(StorageError, OSError)


def test_local_staging_stays_on_the_same_filesystem(tmp_path: Path):
    """The local commit is a rename: staging must live under the run root, never in /tmp."""
    store = CheckpointStore(str(tmp_path / "run"))
    staged = store.begin(1)
    staged.write_bytes("a.bin", b"a")
    staging = [p for p in (tmp_path / "run").rglob("a.bin")]
    assert len(staging) == 1 and os.stat(staging[0]).st_dev == os.stat(tmp_path / "run").st_dev
    staged.commit()
    assert (tmp_path / "run" / "ckpt-000000000001" / "a.bin").read_bytes() == b"a"
    assert not list((tmp_path / "run" / ".staging").iterdir())
    shutil.rmtree(tmp_path / "run")


# -- several writers of one checkpoint (the ranks of a job) -------------------------------------------

def save_sharded(store: CheckpointStore, step: int, world: int = 3) -> Any:
    """Rank 0 begins, every other rank joins with its token (a store of its own, as in another process),
    writes rank-<r>/..., and reports its files; rank 0 adopts them and commits with the world size."""
    staged = store.begin(step)
    joined = []
    for rank in range(1, world):
        peer = CheckpointStore(store.location).join(step, staged.token)
        with peer.open(f"rank-{rank}/shard.bin") as f:
            f.write(bytes([rank]) * (1000 + rank))
        joined.append(peer)
    with staged.open("rank-0/shard.bin") as f:
        f.write(b"\0" * 1000)
    for peer in joined:
        staged.adopt(peer.files)
    return staged.commit(epoch=1, reason="emergency", world_size=world)


def test_ranks_write_one_checkpoint_through_its_token(backend: Backend) -> None:
    store = backend.store()
    info = save_sharded(store, 7)
    assert info.manifest.world_size == 3
    listed = store.get(7)
    assert listed.manifest.world_size == 3 and {f.path for f in listed.manifest.files} == \
        {"rank-0/shard.bin", "rank-1/shard.bin", "rank-2/shard.bin"}
    assert store.verify(listed) == []
    assert read_all(store, listed)["rank-2/shard.bin"] == b"\2" * 1002


def test_one_process_manifests_carry_no_world_size(backend: Backend) -> None:
    save(backend.store(), 3)
    assert b"world_size" not in backend.read_raw("ckpt-000000000003/manifest.json")


def test_a_joined_checkpoint_never_commits_and_a_forged_token_is_refused(backend: Backend) -> None:
    store = backend.store()
    staged = store.begin(9)
    peer = store.join(9, staged.token)
    with pytest.raises(ValueError, match="only the process that began"):
        peer.commit(world_size=2)
    for token in ("../../etc", "ckpt-000000000008.host.1.deadbeef", staged.token + "/.."):
        with pytest.raises((StorageError, CheckpointExists)):
            store.join(9, token)
    staged.abort()
    assert store.list() == []


def test_sharded_checkpoints_copy_prune_and_collect_like_any(backend: Backend, local_peer: CheckpointStore) -> None:
    store = backend.store()
    info = save_sharded(store, 4)
    copied = copy_checkpoint(store, info, local_peer)
    assert copied.manifest.world_size == 3 and local_peer.verify(copied) == []
    assert read_all(local_peer, copied) == read_all(store, info)
    store.delete(4)
    assert store.list() == [] and not [f for f in backend.files() if f.startswith("ckpt-000000000004/")]
    staged = store.begin(5)  # a job whose rank 0 died before committing: its leftovers are collected
    with store.join(5, staged.token).open("rank-1/shard.bin") as f:
        f.write(b"x")
    store.collect_garbage(stale_after_s=0, now=LATER)
    assert store.list() == [] and not [f for f in backend.files() if "ckpt-000000000005" in f]


def test_the_commands_take_sharded_checkpoints(tmp_path: Path) -> None:
    """ls, verify, restore and prune on checkpoints written by 3 ranks (nested rank-<r>/ files)."""
    import json
    import subprocess
    import sys

    run = tmp_path / "run"
    store = CheckpointStore(str(run))
    for step in (1, 2, 3):
        save_sharded(store, step)
    cli = [sys.executable, "-m", "savegame.cli"]
    listed = json.loads(subprocess.run([*cli, "ls", str(run), "--json"], capture_output=True, text=True,
                                       check=True).stdout)
    assert [(r["step"], r["world_size"]) for r in listed] == [(1, 3), (2, 3), (3, 3)]
    assert subprocess.run([*cli, "verify", str(run)], capture_output=True).returncode == 0
    out = tmp_path / "restored"
    subprocess.run([*cli, "restore", str(run), "--step", "2", "--to", str(out)], check=True, capture_output=True)
    assert (out / "ckpt-000000000002" / "rank-2" / "shard.bin").read_bytes() == b"\2" * 1002
    subprocess.run([*cli, "prune", str(run), "--keep-last", "1"], check=True, capture_output=True)
    assert [c.step for c in store.list()] == [3] and not (run / "ckpt-000000000001").exists()
    (run / "ckpt-000000000003" / "rank-1" / "shard.bin").write_bytes(b"torn")
    damaged = subprocess.run([*cli, "verify", str(run)], capture_output=True, text=True)
    assert damaged.returncode == 1 and "rank-1/shard.bin" in damaged.stdout
