"""Under systemd, stderr is a stream to journald, which says so in JOURNAL_STREAM (its device:inode).
Then every line carries its syslog priority (<3> error, <4> warning, <6> info, <7> debug) and no
timestamp of its own, so `journalctl -p warning -u savegame@x` shows exactly the warnings and errors.
Anywhere else the output is unchanged."""
import logging
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from helpers import Daemon, counter, wait_until
from savegame.protocol import DatagramSender

pytestmark = pytest.mark.integration
PRIORITY = {"ERROR": "3", "WARNING": "4", "INFO": "6", "DEBUG": "7"}
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d")


def journal_daemon(run: Path, worker: list, options: list = ()) -> Daemon:
    """A daemon whose stderr file is the 'journal stream' (JOURNAL_STREAM names that file's inode)."""
    daemon = Daemon(run, worker, options)
    daemon.err.parent.mkdir(parents=True, exist_ok=True)
    daemon.err.touch()
    st = os.stat(daemon.err)
    daemon.env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    return daemon


def parse(stderr: str) -> list[tuple[str, str]]:
    """(priority, rest) of every line; each must have a priority that fits its level, and no timestamp."""
    lines = []
    for line in stderr.splitlines():
        match = re.match(r"^<([0-7])>(.*)$", line)
        assert match, f"a line without a priority: {line!r}"
        priority, rest = match.groups()
        assert not TIMESTAMP.search(rest), f"journald adds the time itself: {line!r}"
        level = rest.split(" ", 1)[0]
        if level in PRIORITY:
            assert priority == PRIORITY[level], line
        lines.append((priority, rest))
    return lines


def events_address(worker_pid: int) -> str:
    environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"SAVEGAME_EVENTS="))


def test_a_running_daemon_prefixes_each_line_with_its_priority(tmp_path):
    daemon = journal_daemon(tmp_path / "run", counter("--steps", 100000, "--sleep", 0.01)).start()
    try:
        worker = daemon.ready()
        DatagramSender(events_address(worker)).send("heartbeat", step=1)  # not from the worker: a warning
        wait_until(lambda: "dropped a foreign event" in daemon.stderr, timeout=10)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0, daemon.stderr
    finally:
        daemon.kill()
    lines = parse(daemon.stderr)
    warnings = [rest for priority, rest in lines if int(priority) <= 4]
    assert len(warnings) == 1 and "dropped a foreign event datagram" in warnings[0], warnings
    assert ("6", "INFO starting -> running: worker started " + f"(pid {worker})") in lines
    assert any(p == "6" and "running -> draining: SIGTERM" in rest for p, rest in lines)


def test_errors_are_priority_3(tmp_path):
    daemon = journal_daemon(tmp_path / "run", ["-c", "raise SystemExit(3)"], ["--max-restarts", "0"]).start()
    assert daemon.wait(timeout=30) == 1, daemon.stderr
    errors = [rest for priority, rest in parse(daemon.stderr) if priority == "3"]
    assert len(errors) == 1 and "running -> failed" in errors[0] and "giving up" in errors[0], errors


def test_a_configuration_error_is_priority_3(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("kep = 3\n")
    daemon = journal_daemon(tmp_path / "run", ["-c", "pass"], ["--config", str(bad)]).start()
    assert daemon.wait(timeout=30) == 78
    assert parse(daemon.stderr) == [("3", f"savegame: configuration error: config {bad}: unknown key 'kep' "
                                          + daemon.stderr.split("unknown key 'kep' ", 1)[1].rstrip("\n"))]


@pytest.mark.parametrize("journal", ["another-file", "absent", "garbage"])
def test_without_the_journal_nothing_changes(tmp_path, journal):
    daemon = Daemon(tmp_path / "run", ["-c", "raise SystemExit(3)"], ["--max-restarts", "0"])
    if journal == "another-file":  # a stream journald gave an ancestor, not the one this stderr is
        daemon.out.parent.mkdir(parents=True, exist_ok=True)
        daemon.out.touch()
        daemon.env["JOURNAL_STREAM"] = f"{os.stat(daemon.out).st_dev}:{os.stat(daemon.out).st_ino}"
    elif journal == "garbage":
        daemon.env["JOURNAL_STREAM"] = "8:x:y"
    assert daemon.start().wait(timeout=30) == 1
    lines = daemon.stderr.splitlines()
    assert lines and all(TIMESTAMP.match(line) and " savegame " in line for line in lines), lines
    assert not any(line.startswith("<") for line in lines)


def test_every_line_of_a_multi_line_record_carries_the_priority():
    from savegame.journal import JournalFormatter

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.LogRecord("savegame", logging.ERROR, __file__, 1, "internal error: %s\nsecond line",
                                   ("boom",), sys.exc_info())
    text = JournalFormatter().format(record)
    assert len(text.splitlines()) > 3 and all(line.startswith("<3>") for line in text.splitlines()), text
    debug = logging.LogRecord("savegame", logging.DEBUG, __file__, 1, "poll", (), None)
    critical = logging.LogRecord("savegame", logging.CRITICAL, __file__, 1, "x", (), None)
    assert JournalFormatter().format(debug) == "<7>DEBUG poll" and JournalFormatter().format(critical).startswith("<2>")


def test_journal_stream_matches_only_the_stream_it_names(tmp_path):
    from savegame.journal import journal_stream

    path = tmp_path / "f"
    path.write_text("")
    other = tmp_path / "g"
    other.write_text("")
    with open(path, "w") as f, open(other, "w") as g:
        st = os.fstat(f.fileno())
        named = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert journal_stream(named, f.fileno())
        assert not journal_stream(named, g.fileno())
        assert not journal_stream({}, f.fileno())
        assert not journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:"}, f.fileno())
        assert not journal_stream(named, 987)  # not an open descriptor
