"""The hand-over's capture copies straight into a segment (issue 13): the writer thread adds the
header, state.json and the meta around bytes already in place, and a segment lent to a capture that
never reaches the writer is free again. Real segments (in tmp_path), a fake link that records sends."""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pytest

from savegame.snapshot.layout import PAGE, Status
from savegame.snapshot.persist import open_segment, persist
from savegame.storage import CheckpointStore
from savegame.worker import segments as segments_module
from savegame.worker.handover import HandoverWriter
from savegame.worker.numpy import NumpyAdapter
from savegame.worker.safetensors_io import TensorBlob, buffer_address, write_safetensors
from savegame.worker.writer import DIRECT_ALIGN, SaveJob, tensors_metadata

pytestmark = pytest.mark.unit


class FakeLink:
    gone = False

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def try_send(self, event: str, **fields: Any) -> bool:
        self.sent.append((event, fields))
        return True


def make(tmp_path):
    folder = tmp_path / "segments"
    folder.mkdir()
    store = CheckpointStore(str(tmp_path / "run"))
    done: list[Any] = []
    writer = HandoverWriter(store, str(folder), FakeLink(), lambda job, info, exc: done.append((info, exc)),
                            lambda job, seconds: done.append(("daemon", job.step)))
    adapter = NumpyAdapter()
    adapter.add(weights=np.arange(300_000, dtype=np.float32), odd=np.arange(7, dtype=np.int16),
                table=np.ones((5, 3), dtype=np.float64).T, flag=np.array(True))  # .T: not contiguous
    return writer, adapter, store, str(folder), done


def job(capture, step):
    return SaveJob(capture, {"format": 1}, step, 0, "periodic", {}, "numpy", "run", None)


def test_the_capture_lies_in_the_segment_and_the_writer_copies_no_tensor_byte(tmp_path, monkeypatch):
    writer, adapter, store, folder, done = make(tmp_path)
    capture = adapter.capture_into(lambda specs: writer.reserve(specs, 12))
    segment = capture.reserved.owner
    assert adapter._buffers == {}  # no buffers of its own besides the segment
    for blob in capture.blobs:  # every tensor already in the segment, where state.safetensors puts it
        assert segment.address + PAGE <= buffer_address(blob.data) < segment.address + segment.capacity
    copied: list[int] = []

    class CountingSink(segments_module.SegmentSink):
        def write(self, data: Any) -> int:
            view = memoryview(data).cast("B")
            if buffer_address(view) != self._base + self.pos:
                copied.append(view.nbytes)
            return super().write(data)

    monkeypatch.setattr("savegame.worker.handover.SegmentSink", CountingSink)
    writer.submit(job(capture, 12))
    writer.make_room()
    assert writer._link.sent == [("snapshot", {"segment": segment.name, "step": 12, "seq": 1})]
    assert segment.status == Status.READY
    assert len(copied) == 2 and sum(copied) < 16 << 10  # the header and state.json: not one tensor byte
    # the segment holds exactly what the in-process writer writes
    expected = io.BytesIO()
    copies = [TensorBlob(b.name, b.dtype, b.shape, memoryview(bytes(b.data))) for b in capture.blobs]
    length = write_safetensors(expected, copies, tensors_metadata(12), align=DIRECT_ALIGN)
    assert bytes(segment.buffer[PAGE:PAGE + length]) == expected.getvalue()
    fd = open_segment(folder, segment.name, os.getpid())  # the daemon's side
    try:
        info = persist(fd, store)
    finally:
        os.close(fd)
    assert store.verify(info) == []
    writer.wait()
    assert done == [("daemon", 12)]
    writer.close()


def test_a_segment_lent_to_a_capture_that_never_reached_the_writer_is_free_again(tmp_path):
    writer, adapter, store, folder, done = make(tmp_path)
    lent = [adapter.capture_into(lambda specs: writer.reserve(specs, step)).reserved.owner for step in (1, 2, 3)]
    # three captures abandoned (never submitted): each one's segment went back; none waits for a third
    assert lent[0] is lent[1] is lent[2]
    capture = adapter.capture()  # a capture in its own buffers: handed over by copying
    writer.submit(job(capture, 4))
    writer.make_room()
    assert lent[0].status == Status.READY and lent[0].job is not None  # the stale reservation was freed, reused
    writer._segments[0].set_status(Status.COMMITTED)
    writer.wait()
    writer.close()


def test_a_rendered_file_goes_into_the_segment_and_one_that_outgrows_its_room_is_written_here(tmp_path):
    """Files a capture renders (Keras' .weights.h5) are handed over too: sized by the capture's
    estimate, then by their last size; a file larger than its room is written in-process, once."""
    from savegame.worker.adapter import Capture

    writer, _adapter, store, folder, done = make(tmp_path)
    payload = os.urandom(300_000)

    def render(sink: Any) -> None:
        for start in range(0, len(payload), 65536):
            sink.write(payload[start:start + 65536])

    capture = Capture(state={"x": 1}, files={"model.weights.h5": render}, file_bytes={"model.weights.h5": 1000})
    writer.submit(job(capture, 4))  # the estimate is far too small
    writer.wait()
    assert writer._link.sent == [] and done == [(store.list()[-1], None)]  # written here, not handed over
    capture = Capture(state={"x": 2}, files={"model.weights.h5": render}, file_bytes={"model.weights.h5": 1000})
    writer.submit(job(capture, 8))  # sized by the last save's file now
    writer.make_room()
    (event, fields), = writer._link.sent
    assert event == "snapshot" and fields["step"] == 8
    fd = open_segment(folder, fields["segment"], os.getpid())  # the daemon's side
    try:
        info = persist(fd, store)
    finally:
        os.close(fd)
    assert store.verify(info) == []
    with open(os.path.join(info.path, "model.weights.h5"), "rb") as f:
        assert f.read() == payload
    assert {f.path for f in info.manifest.files} == {"state.safetensors", "state.json", "model.weights.h5"}


def test_a_disk_error_while_the_worker_commits_a_segment_itself_is_reported_as_it_is(tmp_path, monkeypatch):
    """The worker commits a segment itself (the daemon refused it, is gone, or never answered) with a
    buffer of its own: a write that fails part-way must surface as that error (a full disk), not as
    the BufferError of closing a buffer the error's traceback still holds views of."""
    import errno

    from savegame.snapshot.persist import commit_claimed
    from savegame.storage import direct as direct_io

    writer, adapter, store, folder, done = make(tmp_path)
    capture = adapter.capture_into(lambda specs: writer.reserve(specs, 12))
    segment = capture.reserved.owner
    writer.submit(job(capture, 12))
    writer.make_room()
    assert segment.status == Status.READY
    send = direct_io.DirectWrites._send

    def full_disk(self, view, direct):  # the disk is full when the tensors' bytes are sent
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct_io.DirectWrites, "_send", full_disk)
    with pytest.raises(OSError) as raised:
        commit_claimed(segment.fd, store)  # as HandoverWriter._write_here does: no buffer given
    assert raised.value.errno == errno.ENOSPC, raised.value
    assert segment.status == Status.FAILED
    monkeypatch.setattr(direct_io.DirectWrites, "_send", send)
    segment.job = None
    writer.close()
