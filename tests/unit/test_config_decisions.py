"""Config for the decisions: `every_seconds = "auto"`, `mtbf_prior`, `[rollback]`, `preemption_signal`,
`preemption_endpoint`. Bad values name the key, the value and what is allowed."""
from __future__ import annotations

import pytest

from savegame.config import Layer, build_config, explicit_for_worker, read_toml
from savegame.errors import ConfigError
from savegame.strategies import EveryNSeconds
from savegame.strategies.anomaly import RollbackRule
from savegame.strategies.interval import BOOTSTRAP_S

pytestmark = pytest.mark.unit


def build(**values):
    return build_config([Layer("test layer", values)])


def config_error(values) -> str:
    with pytest.raises(ConfigError) as info:
        build(**values)
    return str(info.value)


def test_every_seconds_auto_and_its_prior():
    config = build(save={"every_seconds": "auto", "mtbf_prior": "12h"})
    assert config["save"]["every_seconds"] == "auto" and config.auto_interval
    assert config["save"]["mtbf_prior"] == 12 * 3600.0
    assert EveryNSeconds(BOOTSTRAP_S) in config.schedule().parts  # until a save is measured
    assert EveryNSeconds(321.0) in config.schedule(auto_seconds=321.0).parts
    assert build()["save"]["mtbf_prior"] == 86400.0 and not build().auto_interval
    assert explicit_for_worker(config)["save"] == {"every_seconds": "auto", "mtbf_prior": 43200.0}


@pytest.mark.parametrize("values, shown, allowed", [
    ({"save": {"every_seconds": "automatic"}}, "save.every_seconds = 'automatic'", "or \"auto\""),
    ({"save": {"mtbf_prior": 0}}, "save.mtbf_prior = 0", "more than 0"),
    ({"save": {"mtbf_prior": "soon"}}, "save.mtbf_prior = 'soon'", "duration"),
    ({"rollback": {"on": "nan"}}, "rollback.on = 'nan'", "a list of nan, spike"),
    ({"rollback": {"on": ["nan", "boom"]}}, "rollback.on = ['nan', 'boom']", "nan, spike"),
    ({"rollback": {"spike_factor": 1}}, "rollback.spike_factor = 1", "more than 1"),
    ({"rollback": {"spike_factor": "big"}}, "rollback.spike_factor = 'big'", "more than 1"),
    ({"rollback": {"window": 0}}, "rollback.window = 0", "integer >= 1"),
    ({"rollback": {"max": -1}}, "rollback.max = -1", "integer >= 0"),
    ({"rollback": {"skip_batches": "yes"}}, "rollback.skip_batches = 'yes'", "true or false"),
    ({"rollback": {"spike_factr": 3}}, "'rollback.spike_factr'", "did you mean 'rollback.spike_factor'"),
    ({"rollback": ["nan"]}, "[rollback] must be a table", ""),
    ({"preemption_signal": "SIGKILL"}, "preemption_signal = 'SIGKILL'", "SIGUSR1 or SIGUSR2"),
    ({"preemption_signal": 10}, "preemption_signal = 10", "SIGUSR1 or SIGUSR2"),
    ({"preemption_endpoint": "169.254.169.254"}, "preemption_endpoint = '169.254.169.254'", "http(s) URL"),
])
def test_bad_values(values, shown, allowed):
    message = config_error(values)
    assert message.startswith("test layer: ") and shown in message and allowed in message, message


def test_rollback_section_and_its_rule():
    assert build().rollback_rule() == RollbackRule()  # off by default
    assert not build().rollback_rule().enabled
    config = build(rollback={"on": ["nan", "spike"], "spike_factor": 5, "window": 50, "max": 2,
                             "skip_batches": True})
    assert config.rollback_rule() == RollbackRule(("nan", "spike"), 5.0, 50, 2, True)
    assert config.restart_policy().max_rollbacks == 2
    assert explicit_for_worker(config)["rollback"]["on"] == ["nan", "spike"]  # the worker follows the daemon's


def test_rollback_as_an_inline_table_in_a_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('rollback = {on = ["nan", "spike"], spike_factor = 10, window = 100, max = 3}\n'
                    'preemption_signal = "USR1"\npreemption_endpoint = "http://127.0.0.1:8080"\n')
    config = build_config([read_toml(str(path))])
    assert config.rollback_rule() == RollbackRule(("nan", "spike"), 10.0, 100, 3, False)
    assert config["preemption_signal"] == "SIGUSR1"  # normalized
    assert config["preemption_endpoint"] == "http://127.0.0.1:8080"
