"""Reading the clouds' notices (pure: one metadata answer at a time): stop, checkpoint, or nothing."""
import json

import pytest

from savegame.daemon.notices import (PROVIDERS, aws_rebalance, aws_spot, azure_events, gcp_maintenance,
                                     gcp_preempted, notice_source)
from savegame.errors import ConfigError

pytestmark = pytest.mark.unit
SPOT = '{"action": "terminate", "time": "2026-11-26T08:22:00Z"}'


def azure(*events, incarnation=1):
    return json.dumps({"DocumentIncarnation": incarnation, "Events": list(events)})


def event(kind, resources=("vm1",), event_id="e1", status="Scheduled"):
    return {"EventId": event_id, "EventType": kind, "EventStatus": status, "Resources": list(resources),
            "NotBefore": "Mon, 19 Sep 2026 18:29:47 GMT"}


@pytest.mark.parametrize("reader, status, body, action", [
    (gcp_preempted, 200, "FALSE", None), (gcp_preempted, 200, "TRUE", "stop"), (gcp_preempted, 503, "", None),
    (gcp_maintenance, 200, "NONE", None),
    (gcp_maintenance, 200, "TERMINATE_ON_HOST_MAINTENANCE", "stop"),
    (gcp_maintenance, 200, "MIGRATE_ON_HOST_MAINTENANCE", "checkpoint"),
    (gcp_maintenance, 200, "SOMETHING_NEW", None), (gcp_maintenance, 404, "", None),
    (aws_spot, 404, "", None), (aws_spot, 200, SPOT, "stop"),
    (aws_rebalance, 404, "", None), (aws_rebalance, 200, '{"noticeTime": "2026-11-05T11:03:00Z"}', "checkpoint"),
    (azure_events, 200, azure(), None),
    (azure_events, 200, azure(event("Freeze")), None),  # a pause of seconds: not an eviction
    *[(azure_events, 200, azure(event(kind)), "stop") for kind in ("Preempt", "Terminate", "Reboot", "Redeploy")],
    (azure_events, 200, azure(event("Preempt", resources=["vm2"])), None),  # a neighbour's event
    (azure_events, 200, "not json", None), (azure_events, 500, azure(event("Preempt")), None),
])
def test_answers(reader, status, body, action):
    notice = reader(status, body, "vm1")
    assert (notice.action if notice else None) == action


def test_a_spot_interruption_says_when():
    assert aws_spot(200, SPOT, None).what == "preemption notice (aws): spot interruption (terminate at 2026-11-26T08:22:00Z)"


def test_distinct_rebalance_notices_have_distinct_keys():
    first = aws_rebalance(200, '{"noticeTime": "2026-11-05T11:03:00Z"}', None)
    again = aws_rebalance(200, '{"noticeTime": "2026-11-05T11:03:00Z"}', None)
    later = aws_rebalance(200, '{"noticeTime": "2026-11-06T09:00:00Z"}', None)
    assert first.key == again.key != later.key


def test_azure_approves_only_the_events_that_name_this_vm_alone():
    body = azure(event("Preempt", ["vm1"], "mine"), event("Reboot", ["vm1", "vm2"], "shared"),
                 event("Terminate", ["vm3"], "theirs"), event("Freeze", ["vm1"], "pause"))
    notice = azure_events(200, body, "vm1")
    assert notice.action == "stop" and "Preempt" in notice.what and "Reboot" in notice.what
    assert json.loads(notice.ack) == {"StartRequests": [{"EventId": "mine"}]}


def test_azure_without_a_known_name_stops_for_any_eviction_and_approves_nothing():
    notice = azure_events(200, azure(event("Preempt", ["vm2"])), None)
    assert notice.action == "stop" and notice.ack is None


def test_a_plain_url_counts_any_non_false_answer():
    source = notice_source("http://127.0.0.1:9/notice")
    read = source.endpoints[0].read
    assert read(200, "soon", None).what == "preemption notice (url)"
    assert read(200, "false", None) is None and read(404, "x", None) is None


def test_the_endpoint_replaces_the_metadata_servers_address():
    source = notice_source("gcp", "http://127.0.0.1:8080")
    assert source.url(source.endpoints[1].path) == "http://127.0.0.1:8080/computeMetadata/v1/instance/maintenance-event"
    assert PROVIDERS["aws"].url(PROVIDERS["aws"].token_path) == "http://169.254.169.254/latest/api/token"


def test_unknown_provider_is_a_config_error():
    with pytest.raises(ConfigError, match="aws, gcp, azure"):
        notice_source("ibm")
