"""The systemd side: the unit file passes `systemd-analyze verify`, and sd_notify messages arrive,
in order, on a real AF_UNIX datagram socket."""
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import SAVEGAME, Daemon, wait_until

pytestmark = pytest.mark.integration
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "savegame@.service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # An instance of the template, with ExecStart pointing at this checkout's savegame.
    path = tmp_path / "savegame@demo.service"
    path.write_text(unit_text.replace("/usr/local/bin/savegame", SAVEGAME))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)


@needs_systemd
def test_unit_file_passes_systemd_analyze_verify(tmp_path):
    result = verify(UNIT.read_text(), tmp_path)
    # systemd-analyze exits 0 on settings it ignores, so its warnings count as failures too.
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr


@needs_systemd
def test_verify_catches_a_broken_unit(tmp_path):
    broken = UNIT.read_text().replace("Type=notify", "Type=notifyy").replace("KillMode=mixed", "KillMode=gently")
    result = verify(broken, tmp_path)
    assert "Failed to parse service type" in result.stderr and "Failed to parse kill mode" in result.stderr


def test_unit_settings_fit_the_daemon():
    text = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", text, re.M))
    assert settings["Type"] == "notify" and settings["KillMode"] == "mixed"
    assert settings["RestartPreventExitStatus"] == "78 76" and settings["Restart"] == "on-failure"
    assert int(settings["TimeoutStopSec"]) > 25 + 60, "the stop timeout must cover the grace and the mirror upload"
    assert "WatchdogSec" in settings and "EnvironmentFile" in settings
    assert "network-online.target" in settings["After"]
    # Never root: a dedicated user, and the run folder is its private state directory.
    assert settings.get("User") not in (None, "", "root", "0") and settings["StateDirectory"] == "savegame/%i"
    assert settings["StateDirectoryMode"] == "0700" and "--dir /var/lib/savegame/%i" in settings["ExecStart"]


def collect(sock: socket.socket, into: list) -> None:
    sock.settimeout(0.05)
    try:
        while True:
            into.append(sock.recv(4096).decode())
    except (socket.timeout, BlockingIOError):
        pass


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_messages_arrive_in_order(tmp_path, abstract):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"savegame-test-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    probe = tmp_path / "worker_env.txt"
    worker = ["-c", f"import os, time\nopen({str(probe)!r}, 'w').write(repr(sorted(os.environ)))\n"
                    "import savegame, numpy as np\nw = np.zeros(4)\nc = savegame.Checkpointer(every_steps=50)\n"
                    "c.track(w=w); c.restore()\nwhile True:\n    w += 1; time.sleep(0.01); c.step()\n"]
    daemon = Daemon(tmp_path / "run", worker, ["--grace", "5"],
                    env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}).start()
    messages: list[str] = []
    try:
        daemon.ready()
        wait_until(lambda: collect(sock, messages) or sum("WATCHDOG=1" in m for m in messages) >= 1, timeout=10)
        before = sum("WATCHDOG=1" in m for m in messages)
        time.sleep(2.0)
        collect(sock, messages)
        pings = sum("WATCHDOG=1" in m for m in messages) - before
        # One every 0.2 s (half of WATCHDOG_USEC): about 10 in 2 s; wide bounds so a loaded machine
        # passes, yet "never" or "every loop turn" (hundreds) fails.
        assert 4 <= pings <= 20, f"{pings} pings in 2 s, expected one every 0.2 s (half of WATCHDOG_USEC)"
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(timeout=15) == 0, daemon.stderr
        collect(sock, messages)
    finally:
        daemon.kill()
        sock.close()
    first = {key: next(i for i, m in enumerate(messages) if key in m)
             for key in ("READY=1", "WATCHDOG=1", "STOPPING=1", "EXTEND_TIMEOUT_USEC=")}
    assert first["READY=1"] < first["STOPPING=1"] < first["EXTEND_TIMEOUT_USEC="]
    assert any(line.startswith("STATUS=running") for m in messages for line in m.splitlines())
    assert "STATUS=stopped" in messages[-1]
    env_names = probe.read_text()
    assert "NOTIFY_SOCKET" not in env_names and "WATCHDOG_USEC" not in env_names
    assert "SAVEGAME_EVENTS" in env_names and "SAVEGAME_RESUME_FROM" in env_names


def test_no_notify_socket_means_no_messages_and_no_error(tmp_path):
    daemon = Daemon(tmp_path / "run", ["-c", "print('hi')"]).start()
    assert daemon.wait(timeout=20) == 0
    assert "Traceback" not in daemon.stderr


def test_daemon_never_imports_a_framework():
    code = ("import sys, savegame.cli, savegame.daemon.supervisor, savegame.storage, savegame.strategies\n"
            "bad = [m for m in ('torch', 'tensorflow', 'keras', 'numpy', 'jax') if m in sys.modules]\n"
            "bad += [m for m in sys.modules if m.startswith('savegame.worker')]  # the daemon's code is its own\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
