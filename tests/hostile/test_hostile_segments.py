"""Snapshot segments a hostile or half-dead worker could leave: every one is refused with
MalformedInput (set FAILED where it can be), nothing is committed, and the daemon lives on; and a
segment whose lock another process holds is never committed by the daemon."""
from __future__ import annotations

import os
import struct
import textwrap

import pytest
from hypothesis import given, settings, strategies as st

from helpers import Daemon, committed_steps
from savegame.errors import MalformedInput
from savegame.snapshot.layout import PAGE, STATUS_AT, FileSpan, SnapshotMeta, Status
from savegame.snapshot.persist import SegmentBusy, claim, open_segment, persist
from savegame.storage import CheckpointStore
from savegame.worker.segments import create_segment, publish

STATE = b'{"format": 1}'


def good_segment(folder, step=7, files=None, state=STATE):
    """A well-formed READY segment made by the worker's own code, and its descriptor for the daemon."""
    segment = create_segment(str(folder), 0, 4 * PAGE)
    segment.buffer[PAGE:PAGE + len(state)] = state
    files = files or (FileSpan("state.json", PAGE, len(state)),)
    publish(segment, SnapshotMeta(step, 0, "periodic", {}, "torch", "r", None, files), 2 * PAGE, 1)
    return segment


def status_of(segment):
    return struct.unpack_from("<I", segment.buffer, STATUS_AT)[0]


@pytest.mark.unit
def test_a_well_formed_segment_commits_and_verifies(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    segment = good_segment(tmp_path)
    fd = open_segment(str(tmp_path), segment.name, os.getpid())
    info = persist(fd, store)
    os.close(fd)
    assert info.step == 7 and store.verify(info) == [] and status_of(segment) == Status.COMMITTED


@pytest.mark.unit
def test_a_segment_locked_by_another_is_left_alone_and_one_answered_is_not_committed_again(tmp_path):
    """A worker that got no answer in time commits its segment itself, under the segment's lock: the
    daemon's persist then refuses it and leaves its status alone; once answered, nobody commits it again."""
    store = CheckpointStore(str(tmp_path / "run"))
    segment = good_segment(tmp_path)
    fd = open_segment(str(tmp_path), segment.name, os.getpid())  # the daemon's own descriptor
    try:
        with claim(segment.fd):  # the worker's
            with pytest.raises(SegmentBusy):
                persist(fd, store)
            assert status_of(segment) == Status.READY and store.list() == []
        info = persist(fd, store)
        assert status_of(segment) == Status.COMMITTED and store.verify(info) == []
        with pytest.raises(MalformedInput):
            persist(fd, store)
        assert status_of(segment) == Status.COMMITTED and [c.step for c in store.list()] == [7]
    finally:
        os.close(fd)
        segment.close()


def corruptions():
    return {
        "magic": lambda s: s.buffer.__setitem__(slice(0, 8), b"NOTASEG!"),
        "capacity": lambda s: struct.pack_into("<Q", s.buffer, 32, 1 << 40),
        "meta outside": lambda s: struct.pack_into("<Q", s.buffer, 40, s.capacity - 2),
        "meta huge": lambda s: struct.pack_into("<Q", s.buffer, 48, 1 << 33),
        "step mismatch": lambda s: struct.pack_into("<q", s.buffer, 24, 8),
        "negative step": lambda s: struct.pack_into("<q", s.buffer, 24, -1),
        "status": lambda s: struct.pack_into("<I", s.buffer, STATUS_AT, 99),
        "not ready": lambda s: struct.pack_into("<I", s.buffer, STATUS_AT, Status.FILLING),
        "meta garbage": lambda s: s.buffer.__setitem__(slice(2 * PAGE, 2 * PAGE + 4), b"\xff\x00[["),
    }


def with_meta(tmp_path, files):
    return good_segment(tmp_path, files=files)


BAD_SPANS = {
    "outside": (FileSpan("state.json", PAGE, 1 << 30),),
    "in control page": (FileSpan("state.json", 0, 10),),
    "overlap": (FileSpan("state.json", PAGE, 100), FileSpan("b.json", PAGE + 50, 10)),
    "twice": (FileSpan("state.json", PAGE, 10), FileSpan("state.json", PAGE + 20, 10)),
    "traversal": (FileSpan("../escape.json", PAGE, 10),),
    "absolute": (FileSpan("/etc/x", PAGE, 10),),
    "manifest": (FileSpan("manifest.json", PAGE, 10),),
}


@pytest.mark.unit
@pytest.mark.parametrize("name", list(corruptions()))
def test_a_corrupt_control_page_or_meta_is_refused(tmp_path, name):
    store = CheckpointStore(str(tmp_path / "run"))
    segment = good_segment(tmp_path)
    corruptions()[name](segment)
    fd = open_segment(str(tmp_path), segment.name, os.getpid())
    with pytest.raises(MalformedInput):
        persist(fd, store)
    os.close(fd)
    assert store.list() == [] and not list((tmp_path / "run").glob("ckpt-*"))


@pytest.mark.unit
@pytest.mark.parametrize("name", list(BAD_SPANS))
def test_files_outside_the_segment_or_overlapping_or_badly_named_are_refused(tmp_path, name):
    store = CheckpointStore(str(tmp_path / "run"))
    segment = with_meta(tmp_path, BAD_SPANS[name])
    fd = open_segment(str(tmp_path), segment.name, os.getpid())
    with pytest.raises(MalformedInput):
        persist(fd, store)
    os.close(fd)
    assert status_of(segment) == Status.FAILED and store.list() == []


@pytest.mark.unit
def test_a_segment_cut_short_after_the_hand_over_is_refused_without_a_fault(tmp_path):
    store = CheckpointStore(str(tmp_path / "run"))
    segment = good_segment(tmp_path)
    os.truncate(segment.path, PAGE)  # the daemon reads with pread: a short file, never a SIGBUS
    fd = open_segment(str(tmp_path), segment.name, os.getpid())
    with pytest.raises(MalformedInput):
        persist(fd, store)
    os.close(fd)
    assert store.list() == []


@pytest.mark.unit
def test_a_segment_of_another_process_a_symlink_or_an_odd_name_is_not_opened(tmp_path):
    segment = good_segment(tmp_path)
    with pytest.raises(MalformedInput):
        open_segment(str(tmp_path), segment.name, os.getpid() + 1)  # named for another sender
    for name in ("../seg-1-0", "seg-x-0", "", "seg-1-0/.."):
        with pytest.raises(MalformedInput):
            open_segment(str(tmp_path), name, 1)
    os.symlink(segment.path, tmp_path / f"seg-{os.getpid()}-1")
    with pytest.raises(MalformedInput):
        open_segment(str(tmp_path), f"seg-{os.getpid()}-1", os.getpid())
    os.link(segment.path, tmp_path / f"seg-{os.getpid()}-2")  # a hard link to a file elsewhere
    with pytest.raises(MalformedInput):
        open_segment(str(tmp_path), f"seg-{os.getpid()}-2", os.getpid())


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=200), st.integers(0, 3 * PAGE))
def test_random_bytes_anywhere_never_do_more_than_refuse(tmp_path_factory, junk, where):
    folder = tmp_path_factory.mktemp("seg")
    store = CheckpointStore(str(folder / "run"))
    segment = good_segment(folder)
    segment.buffer[where:where + len(junk)] = junk[:max(0, segment.capacity - where)]
    fd = open_segment(str(folder), segment.name, os.getpid())
    try:
        info = persist(fd, store)
        assert store.verify(info) == []  # whatever passed is a consistent checkpoint
    except MalformedInput:
        pass
    finally:
        os.close(fd)
        segment.close()


HOSTILE_WORKER = textwrap.dedent("""
    import os, time
    from savegame.protocol import DatagramSender
    folder = os.environ["SAVEGAME_SEGMENTS"]
    sender = DatagramSender(os.environ["SAVEGAME_EVENTS"])
    sender.send("hello", handles=[], rank=0, world_size=1)
    bad = os.path.join(folder, f"seg-{os.getpid()}-0")
    with open(bad, "wb") as f:
        f.write(b"\\xff" * 9000)
    os.symlink("/etc/passwd", os.path.join(folder, f"seg-{os.getpid()}-1"))
    for name in (f"seg-{os.getpid()}-0", f"seg-{os.getpid()}-1", "../../etc/passwd", f"seg-1-0", None, 7):
        sender.send("snapshot", segment=name, step=3, seq=1)
    time.sleep(1.0)
    print("still-here", flush=True)
""")


@pytest.mark.integration
def test_a_hostile_worker_cannot_crash_the_daemon_with_segments(tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, ["-c", HOSTILE_WORKER], ["--shared-memory"]).start()
    assert daemon.wait(60) == 0, daemon.stderr[-3000:]
    assert "still-here" in daemon.stdout
    assert daemon.stderr.count("dropped a snapshot hand-over") >= 5
    assert committed_steps(run) == []
