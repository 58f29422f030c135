"""Config: one validation for every layer; errors name the source, the key, the value and what is allowed."""
from __future__ import annotations

from datetime import timedelta

import pytest

from savegame.config import Layer, build_config, duration, explicit_for_worker, read_toml
from savegame.errors import ConfigError
from savegame.strategies import (AnyOf, EveryNEpochs, EveryNSeconds, EveryNSteps, KeepBest, KeepEvery, KeepLast,
                                 KeepThinning, OnImprovement, RestartPolicy, ThinningTier)

pytestmark = pytest.mark.unit


def build(**values):
    return build_config([Layer("test layer", values)])


def config_error(values) -> str:
    with pytest.raises(ConfigError) as info:
        build_config([Layer("test layer", values)])
    assert isinstance(info.value, ValueError)
    return str(info.value)


# ---------------------------------------------------------------- keys

@pytest.mark.parametrize("values, names, allowed", [
    ({"bogus": 1}, "'bogus'", ["dir", "monitor", "regime", "keep", "save"]),
    ({"monitr": "acc"}, "'monitor'", ["monitor"]),  # the suggestion
    ({"keep": {"lst": 3}}, "'keep.lst'", ["best", "every", "last", "thin"]),
    ({"keep": {"lats": 3}}, "did you mean 'keep.last'", ["last"]),
    ({"save": {"every_step": 3}}, "did you mean 'save.every_steps'", ["every_epochs", "every_seconds"]),
    ({"mirror_keep": {"x": 1}}, "'mirror_keep.x'", ["last", "best"]),
])
def test_unknown_key_names_the_key_and_what_is_allowed(values, names, allowed):
    message = config_error(values)
    assert message.startswith("test layer: unknown key")
    assert names in message
    assert all(a in message.split("allowed:", 1)[1] for a in allowed)


@pytest.mark.parametrize("section, value", [("save", 3), ("keep", "last=3"), ("mirror_keep", [1])])
def test_a_section_must_be_a_table(section, value):
    message = config_error({section: value})
    assert f"[{section}] must be a table" in message and repr(value) in message


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("values, shown, allowed", [
    ({"regime": "medium"}, "regime = 'medium'", "one of short, normal, long"),
    ({"resume": "oldest"}, "resume = 'oldest'", "one of latest, best, none"),
    ({"mode": "up"}, "mode = 'up'", "one of min, max, auto"),
    ({"max_restarts": -1}, "max_restarts = -1", "integer >= 0"),
    ({"max_restarts": 2.5}, "max_restarts = 2.5", "integer >= 0"),
    ({"max_restarts": True}, "max_restarts = True", "integer >= 0"),
    ({"grace": "soon"}, "grace = 'soon'", "duration"),
    ({"grace": -5}, "grace = -5", "duration"),
    ({"hang_timeout": "10 minutes"}, "hang_timeout = '10 minutes'", "'10m'"),
    ({"dir": ""}, "dir = ''", "non-empty string"),
    ({"monitor": 3}, "monitor = 3", "non-empty string"),
    ({"command": "python train.py"}, "command = 'python train.py'", "list of strings"),
    ({"command": []}, "command = []", "non-empty list"),
    ({"save": {"every_steps": "10"}}, "save.every_steps = '10'", "integer >= 0"),
    ({"save": {"every_epochs": -2}}, "save.every_epochs = -2", "integer >= 0"),
    ({"save": {"on_improvement": "yes"}}, "save.on_improvement = 'yes'", "true or false"),
    ({"save": {"min_delta": -0.1}}, "save.min_delta = -0.1", "number >= 0"),
    ({"save": {"every_seconds": "often"}}, "save.every_seconds = 'often'", "duration"),
    ({"keep": {"last": -1}}, "keep.last = -1", "integer >= 0"),
    ({"keep": {"every_unit": "week"}}, "keep.every_unit = 'week'", "one of step, epoch"),
    ({"keep": {"thin": "1h"}}, "keep.thin = '1h'", "must be a list"),
    ({"keep": {"thin": [{"younger_than": "1d"}]}}, "keep.thin = [{'younger_than': '1d'}]", "each tier"),
    ({"keep": {"thin": [{"younger_than": "1d", "every": 0}]}}, "keep.thin", "more than 0"),
    ({"keep": {"thin": [{"younger_than": "sometime", "every": "1h"}]}}, "keep.thin", "duration"),
    ({"mirror_keep": {"best": "two"}}, "mirror_keep.best = 'two'", "integer >= 0"),
])
def test_bad_value_names_key_value_and_what_is_allowed(values, shown, allowed):
    message = config_error(values)
    assert message.startswith("test layer: ")
    assert shown in message
    assert allowed in message


def test_storage_options_are_never_shown_in_errors():
    message = config_error({"storage": "AKIA-very-secret"})
    assert "storage = <hidden>" in message and "must be a table" in message
    assert "very-secret" not in message


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize("text, seconds", [
    (0, 0.0), (12, 12.0), (1.5, 1.5), ("30", 30.0), ("30s", 30.0), ("500ms", 0.5), ("10m", 600.0),
    ("2h", 7200.0), ("1d", 86400.0), ("2.5h", 9000.0), (" 5 m ", 300.0),
])
def test_durations(text, seconds):
    assert duration(text) == seconds
    assert build(grace=text)["grace"] == seconds


@pytest.mark.parametrize("text", ["5x", "-1s", "", "1d2h", "h", "1 hour", True, False, -3, None, [1], {"s": 1}])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="duration"):
        duration(text)
    assert "grace = " in config_error({"grace": text})


@pytest.mark.parametrize("key", ["grace", "mirror_deadline", "upload_timeout", "backoff_max", "hang_timeout",
                                 "stale_after", "restart_window", "preemption_interval"])
@pytest.mark.parametrize("value", [float("inf"), 1e302, "1e302s", float("nan"), 10**400],
                         ids=["inf", "1e302", "1e302s", "nan", "10**400"])
def test_durations_are_finite_and_bounded(key, value):
    """inf (or 1e302) used to be accepted, and the daemon died of OverflowError mid-save."""
    assert f"{key} = " in config_error({key: value})


def test_the_daemons_own_waits_are_at_most_a_day_and_others_a_year():
    assert build(grace="1d")["grace"] == 86400.0
    assert "at most 1 days" in config_error({"grace": "2d"})
    assert build(hang_timeout="30d")["hang_timeout"] == 30 * 86400.0
    assert "at most 366 days" in config_error({"stale_after": "400d"})


@pytest.mark.parametrize("values", [{"max_restarts": 10**20}, {"keep": {"last": 2**70}}, {"save": {"min_delta": float("inf")}}])
def test_counts_and_numbers_are_bounded(values):
    assert "must be" in config_error(values)


# ---------------------------------------------------------------- files

def test_deeply_nested_toml_is_a_config_error(tmp_path):
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(ConfigError, match="deep.toml"):
        read_toml(str(path))


def test_a_config_that_is_not_a_regular_file_is_refused(tmp_path):
    import os

    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_toml(str(fifo))


def test_toml_file_round_trip(tmp_path):
    path = tmp_path / "savegame.toml"
    path.write_text('regime = "long"\nmonitor = "val_loss"\ngrace = "45s"\n'
                    '[keep]\nlast = 2\nthin = [{younger_than = "6h", every = "30m"}, '
                    '{younger_than = "forever", every = "1d"}]\n[save]\nevery_steps = 500\n')
    config = build_config([read_toml(str(path))])
    assert config.regime == "long" and config["grace"] == 45.0
    assert config.monitor == ("val_loss", "min")
    assert config["keep"]["thin"] == [{"younger_than": 21600.0, "every": 1800.0}, {"younger_than": None, "every": 86400.0}]
    assert config["save"]["every_steps"] == 500 and config["save"]["every_seconds"] == 1800.0  # from the preset


def test_bad_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('regime = "long\n')
    with pytest.raises(ConfigError, match=r"broken\.toml is not valid TOML"):
        read_toml(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(str(tmp_path / "nope.toml"))


def test_unknown_section_in_a_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[retention]\nlast = 3\n")
    with pytest.raises(ConfigError) as info:
        build_config([read_toml(str(path))])
    message = str(info.value)
    assert message.startswith(f"config {path}: unknown key 'retention'")
    assert "keep" in message and "save" in message


def test_bad_value_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[keep]\nlast = -3\n")
    with pytest.raises(ConfigError, match=rf"^config {path}: keep.last = -3: must be an integer >= 0$"):
        build_config([read_toml(str(path))])


# ---------------------------------------------------------------- layering

def test_layers_merge_low_to_high():
    script = Layer("script defaults", {"regime": "short", "grace": 10, "keep": {"last": 4, "every": 7},
                                       "monitor": "acc"})
    file = Layer("config file", {"grace": 20, "keep": {"best": 2}, "save": {"every_steps": 50}})
    flags = Layer("command line", {"grace": 30, "keep": {"every": 9}})
    config = build_config([script, file, flags])
    assert config["grace"] == 30.0  # command line > file > script
    assert config["keep"]["last"] == 4  # script > regime preset (short: 1)
    assert config["keep"]["best"] == 2  # file > preset
    assert config["keep"]["every"] == 9  # command line > script
    assert config["save"]["every_steps"] == 50 and config["save"]["every_epochs"] == 1  # file, then preset
    assert config["max_restarts"] == 5  # the defaults under everything
    assert config.explicit["keep"] == {"last": 4, "every": 9, "best": 2}
    assert "max_restarts" not in config.explicit


def test_a_higher_layer_chooses_the_regime_preset():
    config = build_config([Layer("script defaults", {"regime": "short"}), Layer("command line", {"regime": "long"})])
    assert config.regime == "long" and config["keep"]["last"] == 3 and config["save"]["every_steps"] == 1000
    assert build_config([]).regime == "normal" and build_config([])["keep"]["last"] == 10


def test_a_bad_value_in_any_layer_names_that_layer():
    layers = [Layer("script defaults", {"grace": 1}), Layer("command line", {"grace": "later"})]
    with pytest.raises(ConfigError, match="^command line: grace = 'later'"):
        build_config(layers)


def test_mirror_keep_defaults_to_keep_and_can_differ():
    config = build(keep={"last": 2})
    assert config["mirror_keep"] == config["keep"]
    config = build(keep={"last": 2}, mirror_keep={"last": 20})
    assert config["mirror_keep"]["last"] == 20 and config["keep"]["last"] == 2
    assert config.retention("mirror").policies[0] == KeepLast(20)


# ---------------------------------------------------------------- policy objects

@pytest.mark.parametrize("monitor, mode, resolved", [
    ("val_acc", None, "max"), ("val_loss", None, "min"), ("f1_score", None, "max"), ("perplexity", None, "min"),
    ("val_loss", "max", "max"), ("val_acc", "min", "min"),
])
def test_monitor_mode(monitor, mode, resolved):
    values = {"monitor": monitor, **({"mode": mode} if mode else {})}
    assert build(**values).monitor == (monitor, resolved)
    assert build().monitor is None


def test_policy_objects():
    config = build(regime="long", monitor="val_acc", max_restarts=2, restart_window="2h",
                   backoff_initial="500ms", backoff_max="1m", save={"min_delta": 0.01},
                   keep={"every": 5, "every_unit": "epoch"})
    assert config.schedule().parts == (EveryNSteps(1000), EveryNEpochs(0), EveryNSeconds(1800.0),
                                       OnImprovement("val_acc", "max", 0.01))
    retention = config.retention()
    assert isinstance(retention, AnyOf)
    assert retention.policies[:3] == (KeepLast(3), KeepEvery(5, "epoch"), KeepBest(3, "val_acc", "max"))
    assert retention.policies[3] == KeepThinning((ThinningTier(timedelta(days=1), timedelta(hours=1)),
                                                  ThinningTier(None, timedelta(days=1))))
    assert config.restart_policy() == RestartPolicy(max_restarts=2, window_s=7200.0, backoff_initial_s=0.5,
                                                    backoff_max_s=60.0)


def test_no_improvement_schedule_or_best_policy_without_a_monitor():
    config = build(regime="short")
    assert not any(isinstance(p, OnImprovement) for p in config.schedule().parts)
    assert not any(isinstance(p, KeepBest) for p in config.retention().policies)
    config = build(regime="short", monitor="acc", save={"on_improvement": False}, keep={"best": 0})
    assert not any(isinstance(p, OnImprovement) for p in config.schedule().parts)
    assert not any(isinstance(p, KeepBest) for p in config.retention().policies)


def test_worker_never_gets_storage_options():
    config = build(monitor="acc", storage={"key": "secret"}, keep={"last": 2}, grace=3)
    assert explicit_for_worker(config) == {"monitor": "acc", "keep": {"last": 2}}


def test_worker_oom_score_adj_is_0_by_default_and_a_score_of_the_kernels_range():
    assert build()["worker_oom_score_adj"] == 0
    assert build(worker_oom_score_adj=-1000)["worker_oom_score_adj"] == -1000
    assert build(worker_oom_score_adj=1000)["worker_oom_score_adj"] == 1000
    for bad in (1001, -1001, 2.5, "0", True):
        assert f"worker_oom_score_adj = {bad!r}: must be an integer from -1000 to 1000" in config_error(
            {"worker_oom_score_adj": bad})


def test_hang_detection_is_auto_by_default_with_a_30_minute_floor():
    assert build()["hang_timeout"] == "auto" and build()["hang_floor"] == 1800.0
    assert build(hang_timeout="auto", hang_floor="2s")["hang_floor"] == 2.0
    assert build(hang_timeout=0)["hang_timeout"] == 0.0  # off
    assert build(hang_timeout="45m")["hang_timeout"] == 2700.0
    message = config_error({"hang_timeout": "automatic"})
    assert "hang_timeout = 'automatic'" in message and '"auto"' in message and "'30s'" in message


@pytest.mark.parametrize("flag, expected", [([], True), (["--shared-memory"], True), (["--no-shared-memory"], False)])
def test_the_shared_memory_flag_overrides_the_config_file_both_ways(tmp_path, flag, expected):
    from savegame.cli import build_parser, config_from_args

    config = tmp_path / "run.toml"
    config.write_text("shared_memory = true\n")
    args = build_parser().parse_args(["run", "--config", str(config), *flag, "--", "python", "train.py"])
    assert config_from_args(args)["shared_memory"] is expected
