"""Fault injection for tests (on PYTHONPATH only where a test puts it), in the daemon and in its
worker alike. While the file named by SAVEGAME_TEST_FAULT exists, the fault SAVEGAME_TEST_FAULT_KIND
names is injected:

- `event` (the default): the daemon's handling of a worker event raises, standing in for any bug in
  the daemon's loop;
- `open-segment`: the daemon cannot open a snapshot segment (out of file descriptors), so it never
  answers the worker;
- `render`: the worker's next rendering of a save into a segment fails part-way (once: the file is
  removed);
- `slow-commit`: each commit of a snapshot segment by the daemon takes 4 s more (a big state on a
  slow disk), with `<trigger>.committing` existing while it does;
- `unannounced`: `slow-commit` in the daemon, and the worker's first attempt SIGKILLs itself the
  instant its first segment is READY, before it can send the `snapshot` event.

SAVEGAME_TEST_ANSWER_TIMEOUT, when set, replaces the worker's ANSWER_TIMEOUT_S (seconds).
"""
import errno
import os

TRIGGER = os.environ.get("SAVEGAME_TEST_FAULT", "")
KIND = os.environ.get("SAVEGAME_TEST_FAULT_KIND", "event")


def _armed() -> bool:
    return os.path.exists(TRIGGER)


def _break_event_handling() -> None:
    from savegame.daemon import hang

    observe = hang.HangWatch.observe

    def failing_observe(self, event, now):
        if _armed():
            raise RuntimeError("injected fault in the daemon's event handling")
        return observe(self, event, now)

    hang.HangWatch.observe = failing_observe


def _break_segment_opening() -> None:
    from savegame.daemon import handover
    from savegame.errors import MalformedInput

    open_segment = handover.open_segment

    def failing_open_segment(folder, name, pid):
        if _armed():  # what open_segment raises for EMFILE
            raise MalformedInput(f"cannot open segment {name}: {os.strerror(errno.EMFILE)}")
        return open_segment(folder, name, pid)

    handover.open_segment = failing_open_segment


class _BreaksAfterHeader:
    """A sink that takes the safetensors header, then fails (a fault in the middle of a render)."""

    def __init__(self, sink):
        self._sink = sink
        self._writes = 0

    def write(self, data):
        if self._writes:
            raise OSError(errno.EIO, "injected fault while rendering into the segment")
        self._writes += 1
        return self._sink.write(data)


def _break_one_render() -> None:
    from savegame.worker import handover

    write_safetensors = handover.write_safetensors

    def failing_write_safetensors(sink, *args, **kwargs):
        if _armed():
            os.remove(TRIGGER)  # once
            sink = _BreaksAfterHeader(sink)
        return write_safetensors(sink, *args, **kwargs)

    handover.write_safetensors = failing_write_safetensors


def _slow_down_commits() -> None:
    import time

    from savegame.daemon import handover

    persist = handover.persist

    def slow_persist(fd, store, buffer=None):
        if _armed():
            marker = TRIGGER + ".committing"
            open(marker, "w").close()
            time.sleep(4)
            os.remove(marker)
        return persist(fd, store, buffer)

    handover.persist = slow_persist


def _die_unannounced() -> None:
    import signal

    from savegame.worker import handover

    publish = handover.publish

    def publish_then_die(segment, *args, **kwargs):
        publish(segment, *args, **kwargs)
        if _armed() and os.environ.get("SAVEGAME_ATTEMPT") == "1":
            os.kill(os.getpid(), signal.SIGKILL)

    handover.publish = publish_then_die
    _slow_down_commits()


if os.environ.get("SAVEGAME_TEST_ANSWER_TIMEOUT"):
    from savegame.worker import handover as _handover

    _handover.ANSWER_TIMEOUT_S = float(os.environ["SAVEGAME_TEST_ANSWER_TIMEOUT"])

if TRIGGER:
    {"event": _break_event_handling, "open-segment": _break_segment_opening, "render": _break_one_render,
     "slow-commit": _slow_down_commits, "unannounced": _die_unannounced}[KIND]()
