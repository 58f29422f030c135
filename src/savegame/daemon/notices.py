"""What the clouds' metadata servers say about this VM's future, read one answer at a time (pure).

Each provider has a few endpoints; each answer is either nothing, a *stop* notice (the VM is going
away: emergency checkpoint, then exit) or a *checkpoint* notice (it may go away: checkpoint now and
keep training):

- AWS: `spot/instance-action` (a spot interruption, 2 minutes ahead): stop;
  `events/recommendations/rebalance` (an elevated risk of interruption): checkpoint.
- GCP: `instance/preempted` TRUE: stop; `instance/maintenance-event`
  TERMINATE_ON_HOST_MAINTENANCE: stop, MIGRATE_ON_HOST_MAINTENANCE: checkpoint (live migration
  usually works; a checkpoint first costs little), NONE: nothing.
- Azure Scheduled Events: Preempt, Terminate, Reboot, Redeploy for this VM: stop, and once the
  emergency checkpoint is safe the event is approved (StartRequests) so the platform can proceed
  before NotBefore. An event can name several VMs, and approving it lets it proceed for all of
  them, so only events that name this VM alone are approved. Freeze (a pause of seconds) is nothing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

from savegame.errors import ConfigError

Action = Literal["stop", "checkpoint"]
AZURE_EVICTING = ("Preempt", "Terminate", "Reboot", "Redeploy")
AZURE_EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"
AZURE_NAME = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"


@dataclass(frozen=True)
class Notice:
    action: Action
    what: str  # for the log: "AWS spot interruption (terminate at ...)"
    key: str  # a checkpoint notice is acted on once per key (the server repeats it at every poll)
    ack: Optional[bytes] = None  # Azure: the POST body that approves the event, once it is safe


Reader = Callable[[int, str, Optional[str]], Optional[Notice]]  # (status, body, this VM's name)


@dataclass(frozen=True)
class Endpoint:
    path: str
    read: Reader


@dataclass(frozen=True)
class NoticeSource:
    name: str
    base: str  # scheme and host of the metadata server
    endpoints: tuple[Endpoint, ...]
    headers: dict[str, str] = field(default_factory=dict)
    token_path: Optional[str] = None  # AWS IMDSv2: a session token first (PUT)
    name_path: Optional[str] = None  # Azure: this VM's name, to tell its events from its neighbours'
    ack_path: Optional[str] = None  # Azure: where approvals are POSTed

    def url(self, path: Optional[str]) -> Optional[str]:
        return None if path is None else self.base + path


def _json(body: str) -> Any:
    try:
        return json.loads(body or "null")
    except ValueError:
        return None


def aws_spot(status: int, body: str, _name: Optional[str]) -> Optional[Notice]:
    text = body.strip()
    if status != 200 or not text or text.lower() in ("false", "none", "0"):
        return None
    data = _json(text)
    when = f" ({data.get('action', 'stop')} at {data.get('time', '?')})" if isinstance(data, dict) else ""
    return Notice("stop", f"preemption notice (aws): spot interruption{when}", "aws-spot")


def aws_rebalance(status: int, body: str, _name: Optional[str]) -> Optional[Notice]:
    text = body.strip()
    if status != 200 or not text:
        return None
    data = _json(text)
    when = data.get("noticeTime", "?") if isinstance(data, dict) else "?"
    return Notice("checkpoint", f"rebalance recommendation (aws, {when}): checkpointing now, training goes on",
                  f"aws-rebalance {text}")


def gcp_preempted(status: int, body: str, _name: Optional[str]) -> Optional[Notice]:
    if status == 200 and body.strip().upper() == "TRUE":
        return Notice("stop", "preemption notice (gcp)", "gcp-preempted")
    return None


def gcp_maintenance(status: int, body: str, _name: Optional[str]) -> Optional[Notice]:
    value = body.strip().upper()
    if status != 200 or value in ("", "NONE"):
        return None
    if value.startswith("TERMINATE"):
        return Notice("stop", f"host maintenance (gcp): {value}", "gcp-maintenance-terminate")
    if value.startswith("MIGRATE"):
        return Notice("checkpoint", f"host maintenance (gcp): {value}: checkpointing now, training goes on",
                      f"gcp-maintenance {value}")
    return None


def azure_events(status: int, body: str, name: Optional[str]) -> Optional[Notice]:
    data = _json(body) if status == 200 else None
    events = data.get("Events") if isinstance(data, dict) else None
    if not isinstance(events, list):
        return None
    ours = [e for e in events if isinstance(e, dict) and e.get("EventType") in AZURE_EVICTING
            and isinstance(e.get("EventId"), str) and _names_us(e.get("Resources"), name)]
    if not ours:
        return None
    alone = [e["EventId"] for e in ours if name is not None and e.get("Resources") == [name]]
    ack = json.dumps({"StartRequests": [{"EventId": i} for i in alone]}).encode() if alone else None
    kinds = ", ".join(sorted({f"{e['EventType']} not before {e.get('NotBefore') or '?'}" for e in ours}))
    return Notice("stop", f"preemption notice (azure): {kinds}", "azure", ack)


def _names_us(resources: Any, name: Optional[str]) -> bool:
    """An event names this VM; when the name is unknown, every evicting event may be ours."""
    if name is None or not isinstance(resources, list) or not resources:
        return True
    return name in resources


def plain_url(status: int, body: str, _name: Optional[str]) -> Optional[Notice]:
    text = body.strip()
    if status == 200 and text and text.lower() not in ("false", "none", "0"):
        return Notice("stop", "preemption notice (url)", "url")
    return None


AWS_BASE, GCP_BASE = "http://169.254.169.254", "http://metadata.google.internal"
PROVIDERS = {
    "aws": NoticeSource("aws", AWS_BASE, (Endpoint("/latest/meta-data/spot/instance-action", aws_spot),
                                          Endpoint("/latest/meta-data/events/recommendations/rebalance",
                                                   aws_rebalance)),
                        token_path="/latest/api/token"),
    "gcp": NoticeSource("gcp", GCP_BASE, (Endpoint("/computeMetadata/v1/instance/preempted", gcp_preempted),
                                          Endpoint("/computeMetadata/v1/instance/maintenance-event",
                                                   gcp_maintenance)),
                        {"Metadata-Flavor": "Google"}),
    "azure": NoticeSource("azure", AWS_BASE, (Endpoint(AZURE_EVENTS, azure_events),), {"Metadata": "true"},
                          name_path=AZURE_NAME, ack_path=AZURE_EVENTS),
}


def notice_source(setting: str, endpoint: Optional[str] = None) -> NoticeSource:
    """The source for `preemption = ...`; `endpoint` replaces the metadata server's address (a proxy)."""
    if setting in PROVIDERS:
        source = PROVIDERS[setting]
        if endpoint:
            return NoticeSource(source.name, endpoint, source.endpoints, source.headers, source.token_path,
                                source.name_path, source.ack_path)
        return source
    if setting.startswith(("http://", "https://")):
        return NoticeSource("url", "", (Endpoint(setting, plain_url),))
    raise ConfigError(f"preemption = {setting!r}: use aws, gcp, azure or an http(s) URL")
