"""The preemption pollers against fake metadata servers on 127.0.0.1 that insist on what the real
ones insist on: AWS IMDSv2 (a PUT for a session token, then the token on every GET), GCP's
`Metadata-Flavor: Google`, Azure's `Metadata: true` (on reads, and on the POST that approves an
event, whose body must name events it announced). A request without them gets no notice.

The end-to-end tests run a real daemon with `preemption_endpoint` pointing at the fake: an Azure
eviction is approved only once the emergency checkpoint is committed, and an AWS rebalance
recommendation or a GCP live migration checkpoints without stopping."""
import http.server
import json
import threading
import time

import pytest

from helpers import Daemon, committed_steps, counter, wait_until
from savegame.daemon.notices import PROVIDERS, notice_source
from savegame.daemon.preemption import PreemptionWatcher

pytestmark = pytest.mark.integration
TOKEN = "AQAEAF-token"
VM = "trainer_3"


class Metadata(http.server.BaseHTTPRequestHandler):
    """One fake for every provider. Class attributes are the state a test sets and reads."""

    spot = rebalance = preempted = False
    maintenance = "NONE"
    azure_events: list = []
    refused: list = []
    approvals: list = []  # (body, committed steps at that moment)
    run_dir = None

    def _send(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _refuse(self, status):
        Metadata.refused.append((self.command, self.path))
        self._send(status)

    def do_PUT(self):  # noqa: N802
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(200, TOKEN.encode())
        self._refuse(400)

    def do_GET(self):  # noqa: N802
        if self.path.startswith("/latest/meta-data/"):
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                return self._refuse(401)
            if self.path == "/latest/meta-data/spot/instance-action" and Metadata.spot:
                return self._send(200, b'{"action": "terminate", "time": "2026-11-29T12:00:00Z"}')
            if self.path == "/latest/meta-data/events/recommendations/rebalance" and Metadata.rebalance:
                return self._send(200, b'{"noticeTime": "2026-11-29T11:50:00Z"}')
            return self._send(404)
        if self.path.startswith("/computeMetadata/v1/instance/"):
            if self.headers.get("Metadata-Flavor") != "Google":
                return self._refuse(403)
            if self.path.endswith("/preempted"):
                return self._send(200, b"TRUE" if Metadata.preempted else b"FALSE")
            if self.path.endswith("/maintenance-event"):
                return self._send(200, Metadata.maintenance.encode())
            return self._send(404)
        if self.path.startswith("/metadata/"):
            if self.headers.get("Metadata") != "true":
                return self._refuse(400)
            if self.path == "/metadata/scheduledevents?api-version=2020-07-01":
                return self._send(200, json.dumps({"DocumentIncarnation": 2, "Events": Metadata.azure_events}).encode())
            if self.path == "/metadata/instance/compute/name?api-version=2021-02-01&format=text":
                return self._send(200, VM.encode())
        self._send(404)

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/metadata/scheduledevents?api-version=2020-07-01" or self.headers.get("Metadata") != "true":
            return self._refuse(400)
        try:
            ids = [r["EventId"] for r in json.loads(body)["StartRequests"]]
        except (ValueError, KeyError, TypeError):
            return self._refuse(400)
        if not ids or not set(ids) <= {e["EventId"] for e in Metadata.azure_events}:
            return self._refuse(400)
        steps = committed_steps(Metadata.run_dir) if Metadata.run_dir else []
        Metadata.approvals.append((json.loads(body), steps))
        self._send(200)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata():
    Metadata.spot = Metadata.rebalance = Metadata.preempted = False
    Metadata.maintenance, Metadata.azure_events, Metadata.refused, Metadata.approvals = "NONE", [], [], []
    Metadata.run_dir = None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def evicting(kind="Preempt", resources=(VM,), event_id="ev-1"):
    return {"EventId": event_id, "EventType": kind, "EventStatus": "Scheduled", "Resources": list(resources),
            "NotBefore": "Sun, 29 Nov 2026 12:00:30 GMT"}


def watch(provider, base):
    notices = []
    return PreemptionWatcher(notice_source(provider, base), 0.1, notices.append), notices


@pytest.mark.parametrize("provider, announce", [
    ("aws", lambda: setattr(Metadata, "spot", True)),
    ("gcp", lambda: setattr(Metadata, "preempted", True)),
    ("gcp", lambda: setattr(Metadata, "maintenance", "TERMINATE_ON_HOST_MAINTENANCE")),
    ("azure", lambda: Metadata.azure_events.append(evicting("Preempt"))),
    ("azure", lambda: Metadata.azure_events.append(evicting("Redeploy"))),
])
def test_each_provider_is_asked_the_way_it_requires(metadata, provider, announce):
    watcher, notices = watch(provider, metadata)
    assert watcher.poll() is None and not notices  # asked properly: answered, no notice yet
    announce()
    watcher.start()
    try:
        wait_until(lambda: notices, timeout=10)
    finally:
        watcher.stop()
    assert [n.action for n in notices] == ["stop"]
    assert Metadata.refused == []


@pytest.mark.parametrize("provider, announce, what", [
    ("aws", lambda: setattr(Metadata, "rebalance", True), "rebalance recommendation"),
    ("gcp", lambda: setattr(Metadata, "maintenance", "MIGRATE_ON_HOST_MAINTENANCE"), "MIGRATE_ON_HOST_MAINTENANCE"),
])
def test_a_checkpoint_notice_is_reported_once_and_polling_goes_on(metadata, provider, announce, what):
    watcher, notices = watch(provider, metadata)
    announce()
    for _ in range(3):
        watcher.poll()
    assert [n.action for n in notices] == ["checkpoint"] and what in notices[0].what
    Metadata.spot = Metadata.preempted = True  # the stop notice still comes through afterwards
    assert watcher.poll().action == "stop"
    assert Metadata.refused == []


def test_azure_leaves_its_neighbours_events_alone(metadata):
    watcher, notices = watch("azure", metadata)
    Metadata.azure_events.append(evicting("Preempt", resources=["trainer_4"]))
    Metadata.azure_events.append(evicting("Freeze"))
    assert watcher.poll() is None and notices == []
    Metadata.azure_events.append(evicting("Terminate", event_id="ev-2"))
    assert watcher.poll().ack == json.dumps({"StartRequests": [{"EventId": "ev-2"}]}).encode()


def test_the_fake_servers_refuse_requests_without_the_headers(metadata):
    """The fakes are strict, so the tests above can fail: the same sources without headers get nothing."""
    Metadata.spot = Metadata.preempted = True
    Metadata.azure_events.append(evicting())
    for provider in ("aws", "gcp", "azure"):
        source = notice_source(provider, metadata)
        bare = type(source)(source.name, source.base, source.endpoints, ack_path=source.ack_path)  # no headers, no token
        watcher = PreemptionWatcher(bare, 1, lambda _: None)
        assert watcher.poll() is None
        notice = PreemptionWatcher(source, 1, lambda _: None).poll()
        assert notice is not None and not watcher.acknowledge(notice)
    assert len(Metadata.refused) == 2 + 2 + 2  # aws, gcp: both endpoints; azure: the events, the approval
    assert PROVIDERS["azure"].base == "http://169.254.169.254"


# ---------------------------------------------------------------- a real daemon


def config_for(tmp_path, provider, base, extra=""):
    config = tmp_path / "savegame.toml"
    config.write_text(f'preemption = "{provider}"\npreemption_endpoint = "{base}"\npreemption_interval = 0.5\n'
                      f"{extra}[keep]\nlast = 100\n")
    return ["--config", str(config)]


def test_azure_eviction_is_approved_only_after_the_emergency_checkpoint_is_committed(metadata, tmp_path):
    run = tmp_path / "run"
    Metadata.run_dir = run
    # 64 MB of state and no periodic save: the emergency save takes a while, and an early approval shows
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--size-mb", 64, "--every", 10**6),
                    config_for(tmp_path, "azure", metadata)).start()
    daemon.ready()
    Metadata.azure_events.append(evicting("Preempt", event_id="ev-9"))
    assert daemon.wait(timeout=30) == 0, daemon.stderr
    emergency = committed_steps(run)[-1]
    assert json.loads((run / f"ckpt-{emergency:012d}" / "manifest.json").read_text())["reason"] == "emergency"
    assert Metadata.approvals == [({"StartRequests": [{"EventId": "ev-9"}]}, [emergency])]
    assert "preemption notice (azure): Preempt not before" in daemon.stderr
    assert "approved the scheduled event" in daemon.stderr and Metadata.refused == []


def test_azure_eviction_without_an_emergency_checkpoint_is_not_approved(metadata, tmp_path):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 100000, "--sleep", 0.01, "--ignore-term", "--every", 10**6),
                    [*config_for(tmp_path, "azure", metadata), "--grace", "1"]).start()
    daemon.ready()
    Metadata.azure_events.append(evicting("Reboot"))
    assert daemon.wait(timeout=30) == 74, daemon.stderr  # the work since the last checkpoint is lost
    assert Metadata.approvals == [] and "not approving the scheduled event" in daemon.stderr


@pytest.mark.parametrize("provider, announce", [
    ("aws", lambda: setattr(Metadata, "rebalance", True)),
    ("gcp", lambda: setattr(Metadata, "maintenance", "MIGRATE_ON_HOST_MAINTENANCE")),
])
def test_a_rebalance_or_migration_checkpoints_and_training_goes_on(metadata, tmp_path, provider, announce):
    run = tmp_path / "run"
    daemon = Daemon(run, counter("--steps", 300, "--sleep", 0.01, "--every", 10**6),
                    config_for(tmp_path, provider, metadata)).start()
    daemon.ready()
    announce()
    wait_until(lambda: committed_steps(run), timeout=20)
    first = committed_steps(run)[0]
    assert first < 300 and daemon.proc.poll() is None  # checkpointed, still training
    assert json.loads((run / f"ckpt-{first:012d}" / "manifest.json").read_text())["reason"] == "manual"
    time.sleep(1.5)  # the notice is still up at every poll: acted on once
    assert committed_steps(run) == [first]
    assert daemon.wait(timeout=60) == 0, daemon.stderr
    assert "DONE 300" in daemon.stdout and committed_steps(run) == [first, 300]
    assert "checkpointing now, training goes on" in daemon.stderr
