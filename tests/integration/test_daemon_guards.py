"""Guards around the daemon: only its worker is heard, and only one daemon runs per folder."""
import os
import signal
import subprocess
import sys

import pytest

from helpers import Daemon, counter, savegame, wait_until
from savegame.daemon.events import EventInbox
from savegame.protocol import DatagramSender

pytestmark = pytest.mark.integration


def test_events_from_another_process_are_dropped():
    inbox = EventInbox()
    try:
        code = (f"from savegame.protocol import DatagramSender\n"
                f"DatagramSender({inbox.address!r}).send('committed', step=1)")
        other = subprocess.run([sys.executable, "-c", code], check=True)
        assert other.returncode == 0
        DatagramSender(inbox.address).send("heartbeat", step=7)  # from this process
        events = wait_until(lambda: inbox.drain(lambda pid, uid: pid == os.getpid()), timeout=5)
        assert [(e["event"], e["step"]) for e in events] == [("heartbeat", 7)]  # the other one was dropped
    finally:
        inbox.close()


def test_a_second_daemon_on_the_same_folder_is_refused(tmp_path):
    run = tmp_path / "run"
    first = Daemon(run, counter("--steps", 100000, "--sleep", 0.01)).start()
    try:
        first.worker_pid()
        second = savegame("run", "--dir", str(run), "--", sys.executable, "-c", "pass")
        assert second.returncode == 78
        assert f"(pid {first.proc.pid}) already supervises" in second.stderr
    finally:
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0
