"""The daemon's side of a hand-over: read a worker's segment, commit it through the store.

The same store, staging, checksums and O_DIRECT writes as the worker's own writer, so the
checkpoint is byte for byte the one the worker would have written (only `created` differs). The
segment is read with pread into one page-aligned buffer, never mapped (see layout's docstring).
Whoever commits a segment (the daemon, or the worker that got no answer) holds its lock (an
exclusive flock on the file) from before reading its status until the answer is written, so the two
never both commit it.
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import struct
from typing import Iterator, Optional

from savegame.errors import MalformedInput
from savegame.snapshot.layout import (PAGE, SEGMENT_NAME, STATUS_AT, Control, FileSpan, SnapshotMeta, Status,
                                      parse_control, parse_meta)
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.storage.direct import DIRECT_MIN, DirectWrites

CHUNK = 8 << 20


class SegmentBusy(MalformedInput):
    """Another process holds the segment's lock: it is committing it, not us."""


def open_segment(folder: str, name: str, pid: int) -> int:
    """The descriptor of segment `name` in `folder`, made by process `pid`: a regular file of ours,
    never through a symlink; MalformedInput otherwise."""
    match = SEGMENT_NAME.match(name) if isinstance(name, str) else None
    if match is None or int(match.group(1)) != pid:
        raise MalformedInput(f"{name!r} is not a segment of process {pid}")
    try:
        fd = os.open(os.path.join(folder, name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise MalformedInput(f"cannot open segment {name}: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid() or info.st_nlink != 1:
        os.close(fd)
        raise MalformedInput(f"segment {name} is not a plain file of this user")
    return fd


def read_snapshot(fd: int) -> tuple[Control, SnapshotMeta]:
    """The checked control page and meta of a READY segment (MalformedInput otherwise)."""
    size = os.fstat(fd).st_size
    control = parse_control(os.pread(fd, PAGE, 0), size)
    if control.status != Status.READY:
        raise MalformedInput(f"the segment is not ready (status {control.status})")
    raw = os.pread(fd, control.meta_length, control.meta_offset)
    if len(raw) != control.meta_length:
        raise MalformedInput("the segment's meta is cut short")
    return control, parse_meta(raw, control)


def control_at(path: str) -> Optional[Control]:
    """The checked control page of the segment file at `path`, or None when it is not a well-formed one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return parse_control(os.pread(fd, PAGE, 0), os.fstat(fd).st_size)
    except (OSError, MalformedInput):
        return None
    finally:
        os.close(fd)


def ready_step(path: str) -> Optional[int]:
    """The step of the segment file at `path` when it is READY and well formed, else None."""
    control = control_at(path)
    return control.step if control is not None and control.status == Status.READY else None


def set_status(fd: int, status: Status) -> None:
    """Tell the worker (it polls the word): COMMITTED frees the segment for its next save."""
    os.pwrite(fd, struct.pack("<I", status), STATUS_AT)


@contextlib.contextmanager
def claim(fd: int, block: bool = False) -> Iterator[None]:
    """Hold the segment's lock (flock: per open file, so the daemon's and the worker's descriptors
    exclude each other; a dead holder's lock goes with it). SegmentBusy when taken and not `block`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        raise SegmentBusy("the segment is being committed by another process") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def persist(fd: int, store: CheckpointStore, buffer: Optional[mmap.mmap] = None) -> CheckpointInfo:
    """Under the segment's lock (SegmentBusy: another process commits it, its status is left alone),
    commit_claimed()."""
    with claim(fd):
        return commit_claimed(fd, store, buffer)


def commit_claimed(fd: int, store: CheckpointStore, buffer: Optional[mmap.mmap] = None) -> CheckpointInfo:
    """Stage every file of the segment, commit (manifest last), mark the segment COMMITTED; the
    caller holds its lock. A segment no longer READY (already answered) is refused and left as it is.
    MalformedInput for a bad segment, StorageError/OSError for the disk; the segment is then FAILED."""
    if _status_word(fd) != Status.READY:  # re-checked under the lock: committed meanwhile, or never handed over
        raise MalformedInput("the segment is not ready (already answered, or never handed over)")
    try:
        _control, meta = read_snapshot(fd)
        own = buffer is None
        buf = buffer if buffer is not None else mmap.mmap(-1, CHUNK)  # page-aligned: O_DIRECT takes it as is
        try:
            info = _commit(fd, store, meta, buf)
        finally:
            if own:  # a failed write's traceback may still hold views of it: it then goes with them,
                with contextlib.suppress(BufferError):  # and the disk's error is the one raised
                    buf.close()
    except BaseException:
        with contextlib.suppress(OSError):  # the worker then writes this save itself
            set_status(fd, Status.FAILED)
        raise
    set_status(fd, Status.COMMITTED)
    return info


def _status_word(fd: int) -> Optional[int]:
    raw = os.pread(fd, 4, STATUS_AT)
    return struct.unpack("<I", raw)[0] if len(raw) == 4 else None


def _commit(fd: int, store: CheckpointStore, meta: SnapshotMeta, buf: mmap.mmap) -> CheckpointInfo:
    staged = store.begin(meta.step)
    with staged:
        for span in meta.files:
            with staged.open(span.path) as f:
                if span.length >= DIRECT_MIN:
                    with DirectWrites(f) as direct:
                        _copy(fd, span, buf, direct)
                else:
                    _copy(fd, span, buf, f)
        return staged.commit(epoch=meta.epoch, reason=meta.reason, metrics=meta.metrics, framework=meta.framework,
                             run_id=meta.run_id, resumed_from=meta.resumed_from)


def _copy(fd: int, span: FileSpan, buf: mmap.mmap, sink: object) -> None:
    view = memoryview(buf)
    done = 0
    try:
        while done < span.length:
            want = min(len(buf), span.length - done)
            got = os.preadv(fd, [view[:want]], span.offset + done)
            if got <= 0:
                raise MalformedInput(f"segment cut short in {span.path} at {done} of {span.length} bytes")
            sink.write(view[:got])  # type: ignore[attr-defined]
            done += got
    finally:
        view.release()
