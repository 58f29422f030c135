"""Reading the clouds' preemption notices (pure: one metadata answer at a time)."""
import json

import pytest

from savegame.daemon.preemption import PROVIDERS, notice_source
from savegame.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("provider, status, body, expected", [
    ("gcp", 200, "FALSE", False), ("gcp", 200, "TRUE", True), ("gcp", 503, "", False),
    ("aws", 404, "", False), ("aws", 200, '{"action": "terminate", "time": "2026-11-26T08:22:00Z"}', True),
    ("azure", 200, json.dumps({"Events": []}), False),
    ("azure", 200, json.dumps({"Events": [{"EventType": "Reboot"}]}), False),
    ("azure", 200, json.dumps({"Events": [{"EventType": "Preempt", "NotBefore": "..."}]}), True),
    ("azure", 200, "not json", False),
])
def test_provider_answers(provider, status, body, expected):
    assert PROVIDERS[provider].is_notice(status, body) is expected


def test_a_plain_url_counts_any_non_false_answer():
    source = notice_source("http://127.0.0.1:9/notice")
    assert source.is_notice(200, "soon") and not source.is_notice(200, "false") and not source.is_notice(404, "x")


def test_unknown_provider_is_a_config_error():
    with pytest.raises(ConfigError, match="aws, gcp, azure"):
        notice_source("ibm")
