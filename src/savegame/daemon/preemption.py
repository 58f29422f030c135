"""Preemption notices from the cloud's metadata server, polled in a thread.

A preemptible VM is told it will be taken away some time before its shutdown sends SIGTERM: AWS
announces a spot interruption 2 minutes ahead, GCP and Azure about 30 s. Polling the notice gives
the emergency checkpoint that time. `preemption = "aws" | "gcp" | "azure" | URL` in the config; a
plain URL counts as a notice when it answers 200 with a body that is not empty or "false".
"""
from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

from savegame.errors import ConfigError

log = logging.getLogger("savegame")
TIMEOUT_S = 2.0


@dataclass(frozen=True)
class NoticeSource:
    name: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    token_url: Optional[str] = None  # AWS IMDSv2: a session token first

    def is_notice(self, status: int, body: str) -> bool:
        """Pure: whether one answer of the metadata server announces a preemption."""
        if status != 200:
            return False
        text = body.strip()
        if self.name == "gcp":
            return text.upper() == "TRUE"
        if self.name == "azure":
            try:
                events = json.loads(text or "{}").get("Events", [])
            except (ValueError, AttributeError):
                return False
            return any(e.get("EventType") == "Preempt" for e in events if isinstance(e, dict))
        return bool(text) and text.lower() not in ("false", "none", "0")  # aws: any instance-action


PROVIDERS = {
    "aws": NoticeSource("aws", "http://169.254.169.254/latest/meta-data/spot/instance-action",
                        token_url="http://169.254.169.254/latest/api/token"),
    "gcp": NoticeSource("gcp", "http://metadata.google.internal/computeMetadata/v1/instance/preempted",
                        {"Metadata-Flavor": "Google"}),
    "azure": NoticeSource("azure", "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01",
                          {"Metadata": "true"}),
}


def notice_source(setting: str) -> NoticeSource:
    if setting in PROVIDERS:
        return PROVIDERS[setting]
    if setting.startswith(("http://", "https://")):
        return NoticeSource("url", setting)
    raise ConfigError(f"preemption = {setting!r}: use aws, gcp, azure or an http(s) URL")


class PreemptionWatcher:
    """Polls a notice source every `interval_s` and calls `on_notice` once when it announces one."""

    def __init__(self, source: NoticeSource, interval_s: float, on_notice: Callable[[str], None]) -> None:
        self.source = source
        self._interval_s = interval_s
        self._on_notice = on_notice
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="savegame-preemption", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            status, body = self._ask()
            if self.source.is_notice(status, body):
                self._on_notice(f"preemption notice ({self.source.name})")
                return

    def _ask(self) -> tuple[int, str]:
        headers = dict(self.source.headers)
        try:
            if self.source.token_url:
                headers["X-aws-ec2-metadata-token"] = self._fetch(
                    urllib.request.Request(self.source.token_url, method="PUT",
                                           headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"}))[1]
            return self._fetch(urllib.request.Request(self.source.url, headers=headers))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.debug("preemption notice poll failed: %s", exc)
            return 0, ""

    @staticmethod
    def _fetch(request: urllib.request.Request) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 - fixed URLs
                return response.status, response.read(65536).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            return exc.code, ""
