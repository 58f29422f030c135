"""Preemption notices from the cloud's metadata server, polled in a thread.

A preemptible VM is told it will be taken away some time before its shutdown sends SIGTERM: AWS
announces a spot interruption 2 minutes ahead, GCP and Azure about 30 s. Polling the notice gives
the emergency checkpoint that time. `preemption = "aws" | "gcp" | "azure" | URL` in the config; a
plain URL counts as a notice when it answers 200 with a body that is not empty or "false". What
each answer means is read in `notices.py`; this module asks, with the headers each server insists on
(AWS IMDSv2's session token, GCP's Metadata-Flavor, Azure's Metadata), and approves Azure events.
"""
from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from typing import Callable, Optional

from savegame.daemon.notices import PROVIDERS, Notice, NoticeSource, notice_source

log = logging.getLogger("savegame")
TIMEOUT_S = 2.0
__all__ = ["PROVIDERS", "Notice", "NoticeSource", "PreemptionWatcher", "notice_source"]


class PreemptionWatcher:
    """Polls every `interval_s`; calls `on_notice` once for a stop notice (then stops polling) and
    once per distinct checkpoint notice (and goes on)."""

    def __init__(self, source: NoticeSource, interval_s: float, on_notice: Callable[[Notice], None]) -> None:
        self.source = source
        self._interval_s = interval_s
        self._on_notice = on_notice
        self._seen: set[str] = set()
        self._name: Optional[str] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="savegame-preemption", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            notice = self.poll()
            if notice is not None and notice.action == "stop":
                return

    def poll(self) -> Optional[Notice]:
        """Ask every endpoint once; report what is new. The stop notice, if any, is returned."""
        headers = self._headers()
        if headers is None:
            return None
        self._learn_name(headers)
        for endpoint in self.source.endpoints:
            status, body = self._get(self.source.url(endpoint.path), headers)  # type: ignore[arg-type]
            notice = endpoint.read(status, body, self._name)
            if notice is None or (notice.action == "checkpoint" and notice.key in self._seen):
                continue
            self._seen.add(notice.key)
            self._on_notice(notice)
            if notice.action == "stop":
                return notice
        return None

    def acknowledge(self, notice: Notice) -> bool:
        """Approve the events of a notice (Azure), so the platform may proceed now. True when accepted."""
        url = self.source.url(self.source.ack_path)
        headers = self._headers()
        if notice.ack is None or url is None or headers is None:
            return False
        request = urllib.request.Request(url, data=notice.ack, method="POST",
                                         headers={**headers, "Content-Type": "application/json"})
        try:
            status, _ = self._fetch(request)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("could not approve the %s event: %s", self.source.name, exc)
            return False
        if status != 200:
            log.warning("the %s metadata server refused the approval (HTTP %d)", self.source.name, status)
        return status == 200

    def _headers(self) -> Optional[dict[str, str]]:
        """The headers every request needs (AWS: a fresh IMDSv2 token); None when they cannot be had."""
        headers = dict(self.source.headers)
        token_url = self.source.url(self.source.token_path)
        if token_url:
            request = urllib.request.Request(token_url, method="PUT",
                                             headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"})
            try:
                status, token = self._fetch(request)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                log.debug("preemption notice poll failed: %s", exc)
                return None
            if status != 200:
                return None
            headers["X-aws-ec2-metadata-token"] = token
        return headers

    def _learn_name(self, headers: dict[str, str]) -> None:
        url = self.source.url(self.source.name_path)
        if url and self._name is None:
            status, body = self._get(url, headers)
            self._name = (body.strip() or None) if status == 200 else None

    def _get(self, url: str, headers: dict[str, str]) -> tuple[int, str]:
        try:
            return self._fetch(urllib.request.Request(url, headers=headers))
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
