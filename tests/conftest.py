"""Shared fixtures: a real S3-compatible server (moto_server on loopback) and helpers."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto_server on 127.0.0.1, started and stopped by its PID (it can be stopped and restarted)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("moto_server", path=str(BIN)) or shutil.which("moto_server")
        assert exe, "moto_server not found: pip install 'moto[server]'"
        self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("moto_server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    @property
    def env(self) -> dict[str, str]:
        """Environment that points boto/s3fs at this server (for subprocesses)."""
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL_S3": self.endpoint, "AWS_ENDPOINT_URL": self.endpoint}

    @property
    def storage_options(self) -> dict:
        return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": self.endpoint}}

    def make_bucket(self) -> str:
        import s3fs

        name = f"b-{uuid.uuid4().hex[:10]}"
        s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True).mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = S3Server(free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server, with this process's environment pointing at it."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def fault_proxy(s3_server: S3Server) -> Iterator["FaultProxy"]:
    """A fault-injecting HTTP proxy in front of the S3 server (throttle, stall, reset, refuse, 503)."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint).start()
    yield proxy
    proxy.close()


@pytest.fixture(autouse=True)
def no_leftover_daemons() -> Iterator[None]:
    """Whatever a test started with helpers.Daemon is killed when it ends, pass or fail: no daemon
    flushing to a dead server for a minute, no 100,000-step worker running on."""
    from helpers import Daemon

    yield
    while Daemon.started:
        Daemon.started.pop().kill()


@pytest.fixture
def savegame_env() -> dict[str, str]:
    """Environment for subprocesses running savegame (no daemon variables leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env
