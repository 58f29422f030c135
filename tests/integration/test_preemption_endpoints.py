"""The preemption pollers against fake metadata servers on 127.0.0.1 that insist on what the real
ones insist on: AWS IMDSv2 (a PUT for a session token, then the token on every GET), GCP's
`Metadata-Flavor: Google`, Azure's `Metadata: true`. A request without them gets no notice."""
import dataclasses
import http.server
import json
import threading

import pytest

from helpers import wait_until
from savegame.daemon.preemption import PROVIDERS, PreemptionWatcher

pytestmark = pytest.mark.integration
TOKEN = "AQAEAF-token"


class Metadata(http.server.BaseHTTPRequestHandler):
    preempted = False
    refused: list = []

    def _send(self, status, body=b""):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self):  # noqa: N802
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(200, TOKEN.encode())
        Metadata.refused.append(("PUT", self.path))
        self._send(400)

    def do_GET(self):  # noqa: N802
        if self.path == "/latest/meta-data/spot/instance-action":
            if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                Metadata.refused.append(("GET", self.path))
                return self._send(401)
            body = json.dumps({"action": "terminate", "time": "2026-11-29T12:00:00Z"}).encode()
            return self._send(200, body) if Metadata.preempted else self._send(404)
        if self.path == "/computeMetadata/v1/instance/preempted":
            if self.headers.get("Metadata-Flavor") != "Google":
                Metadata.refused.append(("GET", self.path))
                return self._send(403)
            return self._send(200, b"TRUE" if Metadata.preempted else b"FALSE")
        if self.path.startswith("/metadata/scheduledevents?api-version="):
            if self.headers.get("Metadata") != "true":
                Metadata.refused.append(("GET", self.path))
                return self._send(400)
            events = [{"EventId": "1", "EventType": "Preempt", "NotBefore": "soon"}] if Metadata.preempted else []
            return self._send(200, json.dumps({"DocumentIncarnation": 1, "Events": events}).encode())
        self._send(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata():
    Metadata.preempted, Metadata.refused = False, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def local(source, base):
    def rebase(url):
        return None if url is None else base + "/" + url.split("/", 3)[3]
    return dataclasses.replace(source, url=rebase(source.url), token_url=rebase(source.token_url))


@pytest.mark.parametrize("provider", ["aws", "gcp", "azure"])
def test_each_provider_is_asked_the_way_it_requires(metadata, provider):
    notices = []
    watcher = PreemptionWatcher(local(PROVIDERS[provider], metadata), 0.1, notices.append)
    watcher.start()
    try:
        status, _ = watcher._ask()
        assert status in (200, 404) and not notices  # asked properly: answered, no notice yet
        Metadata.preempted = True
        wait_until(lambda: notices, timeout=10)
    finally:
        watcher.stop()
    assert notices == [f"preemption notice ({provider})"]
    assert Metadata.refused == []


def test_the_fake_servers_refuse_requests_without_the_headers(metadata):
    """The fakes are strict, so the test above can fail: the same sources without headers get nothing."""
    Metadata.preempted = True
    for provider in ("aws", "gcp", "azure"):
        bare = dataclasses.replace(local(PROVIDERS[provider], metadata), headers={}, token_url=None)
        status, body = PreemptionWatcher(bare, 1, lambda _: None)._ask()
        assert not bare.is_notice(status, body)
    assert len(Metadata.refused) == 3
