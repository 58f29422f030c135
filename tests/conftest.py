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
from typing import Iterator, Optional

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
def fault_proxy(s3_server: S3Server) -> Iterator[object]:
    """A fault-injecting HTTP proxy in front of the S3 server (throttle, stall, reset, refuse, 503)."""
    from faultproxy import FaultProxy

    proxy = FaultProxy(s3_server.endpoint).start()
    yield proxy
    proxy.close()


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The manifest cache of every listing the suite makes (in this process and in the subprocesses
    it starts, which inherit the variable) goes to a temporary folder, never ~/.cache/savegame."""
    folder = tmp_path_factory.mktemp("savegame-cache")
    before = os.environ.get("SAVEGAME_CACHE_DIR")
    os.environ["SAVEGAME_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("SAVEGAME_CACHE_DIR", None)
    else:
        os.environ["SAVEGAME_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def no_leftover_daemons() -> Iterator[None]:
    """Whatever a test started with helpers.Daemon is killed when it ends, pass or fail: no daemon
    flushing to a dead server for a minute, no 100,000-step worker running on."""
    from helpers import Daemon

    from savegame.snapshot.folder import folder_for, remove

    yield
    while Daemon.started:
        daemon = Daemon.started.pop()
        daemon.kill()
        remove(folder_for(str(daemon.run_dir)))  # what the run's next daemon start would clean (shared memory)


@pytest.fixture
def savegame_env() -> dict[str, str]:
    """Environment for subprocesses running savegame (no daemon variables leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAVEGAME_", "NOTIFY_SOCKET", "WATCHDOG_"))
           or k == "SAVEGAME_CACHE_DIR"}  # the suite's private cache folder (see private_cache_dir)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env



FRAMEWORKS = ROOT / "tests" / "frameworks"
FRAMEWORK_TIERS = ({"frameworks"}, {"frameworks", "chaos"})  # the tier markers a test there may carry


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> Optional[bool]:
    """When the marker expression (-m) selects none of the tests in tests/frameworks/, their modules
    are not even imported: some import torch at module level (test_torch_devices, test_torch_io,
    test_torch_refuse), which made `pytest -m unit` pay seconds of framework imports for tests it
    then deselected."""
    if collection_path.parent != FRAMEWORKS or not collection_path.name.startswith("test_"):
        return None
    expression = config.getoption("markexpr")
    if not expression:
        return None
    try:
        from _pytest.mark.expression import Expression  # no public API evaluates a marker expression

        compiled = Expression.compile(expression)
        if any(compiled.evaluate(lambda name, /, **kwargs: name in marks) for marks in FRAMEWORK_TIERS):
            return None
    except Exception:  # noqa: BLE001 - an expression pytest itself reports, or another pytest: collect as usual
        return None
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep what pytest_ignore_collect relies on true: tests in tests/frameworks/ carry the tiers above."""
    tiers = {m.split(":")[0].strip() for m in config.getini("markers")}
    for item in items:
        if item.path.parent == FRAMEWORKS:
            marks = {m.name for m in item.iter_markers()} & tiers
            if marks not in FRAMEWORK_TIERS:
                raise pytest.UsageError(f"{item.nodeid} is marked {sorted(marks)}; tests in tests/frameworks/ "
                                        f"are marked {' or '.join(str(sorted(t)) for t in FRAMEWORK_TIERS)}")
