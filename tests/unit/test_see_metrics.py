"""The metrics' names follow Prometheus conventions, and their settings are checked like every other key."""
from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from savegame.config import Layer, build_config
from savegame.daemon.counts import Counts
from savegame.daemon.metrics import MetricsExporter
from savegame.errors import ConfigError
from savegame.see import goodput as g
from savegame.see import history

pytestmark = pytest.mark.unit


def snapshot(mirror=None):
    counts = Counts()
    counts.note(history.commit_entry(10, 1, "best", {"loss": 0.5}, 2048, 1, "daemon", 0.25))
    counts.note(history.commit_entry(20, 2, "periodic", {}, 1024, 1, "daemon", 0.75))
    counts.note(history.failed_entry(25, "periodic", "disk full", 1))
    counts.note(history.prune_entry(10, "local", "daemon", "not kept"))
    ledger = g.parse_ledger([{"kind": "attempt", "attempt": 1, "daemon_pid": 5, "daemon_started": 0.0,
                              "spawned": 0.0, "ready": 1.0, "ended": 11.0, "resumed_from": None, "last_step": 30,
                              "stall_s": 0.5, "saves": 2, "cause": "crash", "restarted": True}], "t")
    summary = g.summarize(g.with_open(ledger, g.DaemonLife(5, 0.0, 20.0), None))
    return {"run": "r1", "run_id": "abc", "state": "running", "worker_up": True, "attempt": 2, "step": 31,
            "steps_per_s": 3.0, "mirror": mirror, "counts": counts.copy(), "goodput": summary.to_json(),
            "lost_s": summary.seconds["redone"], "stall_s": summary.seconds["stalls"]}


def families(snap):
    exporter = MetricsExporter(None, None, "r1", lambda: snap)
    return {f.name: f for f in text_string_to_metric_families(generate_latest(exporter.registry).decode())}


def test_names_and_units_follow_the_conventions():
    found = families(snapshot({"lag_s": 1.5, "pending": 2, "confirmed_step": 10, "missing": 0}))
    for name, family in found.items():
        assert name.startswith("savegame_"), name
        assert family.documentation, name
        for sample in family.samples:
            assert sample.labels["run"] == "r1", sample
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
        assert not any(unit in name for unit in ("_ms", "_secs", "_kb", "_mb")), name
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in found.values() for s in f.samples}
    assert values[("savegame_checkpoints_committed_total", (("reason", "best"), ("run", "r1")))] == 1
    assert values[("savegame_checkpoints_failed_total", (("reason", "periodic"), ("run", "r1")))] == 1
    assert values[("savegame_checkpoints_pruned_total", (("run", "r1"), ("tier", "local")))] == 1
    assert values[("savegame_checkpoints_written_bytes_total", (("run", "r1"),))] == 3072
    assert values[("savegame_checkpoint_commit_seconds_sum", (("run", "r1"),))] == pytest.approx(1.0)
    assert values[("savegame_restarts_total", (("cause", "crash"), ("run", "r1")))] == 1
    assert values[("savegame_mirror_lag_seconds", (("run", "r1"),))] == 1.5
    assert values[("savegame_time_seconds", (("category", "waiting"), ("run", "r1")))] == pytest.approx(9)
    assert values[("savegame_goodput_ratio", (("run", "r1"),))] == pytest.approx((10 - 0.5) / 20)
    assert values[("savegame_state", (("run", "r1"), ("state", "running")))] == 1
    assert values[("savegame_state", (("run", "r1"), ("state", "failed")))] == 0


def test_no_mirror_no_mirror_metrics_and_no_snapshot_no_metrics():
    assert not any("mirror" in name for name in families(snapshot()))
    assert families({}) == {}


@pytest.mark.parametrize("values, words", [
    ({"metrics": "9464"}, "HOST:PORT"), ({"metrics": "localhost:70000"}, "HOST:PORT"), ({"metrics": 9464}, "HOST:PORT"),
    ({"metrics_textfile": "/tmp/savegame.txt"}, ".prom"), ({"metrics_textfile": 3}, ".prom")])
def test_bad_settings_are_config_errors(values, words):
    with pytest.raises(ConfigError, match=words):
        build_config([Layer("test layer", values)])


def test_good_settings():
    config = build_config([Layer("t", {"metrics": "[::1]:0", "metrics_textfile": "/var/lib/n/savegame_{run}.prom"})])
    assert config["metrics"] == "[::1]:0" and config["metrics_textfile"].endswith("{run}.prom")
    assert build_config([])["metrics"] is None  # off by default
