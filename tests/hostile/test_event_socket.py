"""The daemon's event socket against hostile senders: no datagram crashes it, no stranger is heard."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from helpers import Daemon, committed_steps, wait_until
from savegame.daemon.events import EventInbox, parse_event
from savegame.protocol import MAX_DATAGRAM, DatagramSender

HOSTILE = [b"[" * 16000, b"{" * 5000, b'{"event": "committed", "step": 1e999}', b"NaN", b"\xff\xfe",
           b'{"event": ' + b'"x" ' * 4000 + b"}", b"1" * 5000, b'{"event": "heartbeat", "step": ' + b"9" * 5000 + b"}",
           b"", b"null", b'"committed"', b'{"event": 7}', b"x" * (MAX_DATAGRAM + 10)]


@pytest.mark.unit
@pytest.mark.parametrize("payload", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_payloads_are_not_events(payload):
    assert parse_event(payload, 1) is None


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2048),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4),
                              max_leaves=30).map(lambda v: json.dumps(v).encode())))
def test_the_event_parser_never_raises(payload):
    event = parse_event(payload, 42)
    assert event is None or (isinstance(event["event"], str) and event["pid"] == 42)


@pytest.mark.integration
def test_the_socket_is_private_and_the_sender_is_checked_before_parsing(tmp_path):
    inbox = EventInbox()
    try:
        folder = Path(inbox.address).parent
        assert folder.stat().st_mode & 0o777 == 0o700
        DatagramSender(inbox.address).send_raw(b"[" * 16000)  # from a sender the inbox refuses
        DatagramSender(inbox.address).send("heartbeat", step=3)
        seen = []
        events = wait_until(lambda: inbox.drain(lambda pid, uid: seen.append(pid) or True), timeout=5)
        assert [e["event"] for e in events] == ["heartbeat"]
        assert inbox.dropped["malformed"] == 1 and seen == [os.getpid(), os.getpid()]
    finally:
        inbox.close()
    assert not folder.exists()


HOSTILE_WORKER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import savegame
    from savegame.protocol import DatagramSender
    weights = np.zeros(4)
    ckpt = savegame.Checkpointer(every_steps=5)
    ckpt.track(weights=weights)
    ckpt.restore()
    junk = [b"[" * 16000, b'{"event": "committed", "step": 1e999}', b"{" * 3000, b"\\xff"]
    sender = DatagramSender(__import__("os").environ["SAVEGAME_EVENTS"])
    while ckpt.progress.step < 100000:
        for payload in junk:
            sender.send_raw(payload)     # the worker's own group: checked, then dropped as malformed
        weights += 1
        time.sleep(0.01)
        ckpt.step()
""")


@pytest.mark.integration
def test_malformed_datagrams_from_the_worker_do_not_crash_the_daemon(tmp_path):
    script = tmp_path / "hostile_worker.py"
    script.write_text(HOSTILE_WORKER)
    daemon = Daemon(tmp_path / "run", [str(script)]).start()
    try:
        wait_until(lambda: committed_steps(daemon.run_dir), timeout=60)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, daemon.stderr[-2000:]
    finally:
        daemon.kill()
    assert "emergency checkpoint committed" in daemon.stderr
    assert "dropped a malformed event datagram" in daemon.stderr
    assert daemon.status()["state"] == "stopped"


@pytest.mark.integration
def test_another_user_cannot_reach_the_socket_and_the_run_goes_on(tmp_path):
    daemon = Daemon(tmp_path / "run", [str(Path(__file__).parent.parent / "workers" / "counter_worker.py"),
                                       "--steps", "100000", "--sleep", "0.01"]).start()
    try:
        worker = daemon.worker_pid()
        environ = wait_until(lambda: Path(f"/proc/{worker}/environ").read_bytes(), timeout=10)
        address = dict(v.split(b"=", 1) for v in environ.split(b"\0") if b"=" in v)[b"SAVEGAME_EVENTS"].decode()
        flood = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
                 "try:\n"
                 f"    for _ in range(2000): s.sendto(b'[' * 16000, {address!r})\n"
                 "except PermissionError:\n"
                 "    sys.exit(13)\n")
        attacker = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                   sys.executable, "-c", flood], capture_output=True, timeout=60)
        assert attacker.returncode == 13, attacker.stderr  # refused by the folder's permissions
        wait_until(lambda: committed_steps(daemon.run_dir), timeout=60)
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, daemon.stderr[-2000:]
    finally:
        daemon.kill()
    assert "emergency checkpoint committed" in daemon.stderr
