"""regime preset < script defaults < script arguments < config < command line, for every adapter: an
adapter's defaults (the Keras callback's "every epoch, keep 1 + 1") give way to a chosen regime."""
from __future__ import annotations

import pytest

from savegame.config import Layer, build_config
from savegame.daemon.status import format_status
from savegame.worker.narrate import did_you_mean

pytestmark = pytest.mark.unit

KERAS_DEFAULTS = Layer("defaults", {"save": {"every_steps": 0, "every_epochs": 1}, "keep": {"last": 1, "best": 1},
                                    "monitor": "val_loss"}, default=True)


def test_defaults_hold_over_the_default_regime() -> None:
    config = build_config([KERAS_DEFAULTS])
    assert config["save"]["every_epochs"] == 1 and config["keep"]["last"] == 1 and config.regime == "normal"


def test_a_regime_chosen_above_replaces_the_defaults_schedule_and_retention() -> None:
    config = build_config([KERAS_DEFAULTS, Layer("command line", {"regime": "long"})])
    long = build_config([Layer("command line", {"regime": "long"})])
    assert config["save"] == long["save"] and config["keep"] == long["keep"]
    assert config["monitor"] == "val_loss"  # not a regime's business: stays


def test_explicit_script_arguments_still_beat_the_preset() -> None:
    config = build_config([KERAS_DEFAULTS, Layer("script", {"save": {"every_steps": 7}}),
                           Layer("command line", {"regime": "long"})])
    assert config["save"]["every_steps"] == 7 and config["keep"]["last"] == 3


def test_a_regime_chosen_by_the_script_replaces_its_defaults_too() -> None:
    config = build_config([KERAS_DEFAULTS, Layer("script", {"regime": "short"})])
    assert config["keep"] == build_config([Layer("script", {"regime": "short"})])["keep"]


@pytest.mark.parametrize("name, reported, expected", [
    ("val_acc", ["val_accuracy", "val_loss", "loss"], "val_accuracy"),
    ("acc", ["accuracy", "loss"], "accuracy"),
    ("val_accuracy", ["val_acc", "loss"], "val_acc"),
    ("val_los", ["val_loss", "loss"], "val_loss"),
    ("f1", ["loss"], None),
])
def test_did_you_mean(name: str, reported: list[str], expected: str) -> None:
    assert did_you_mean(name, reported) == expected


def test_status_shows_epoch_best_and_the_effective_policy() -> None:
    policy = build_config([Layer("cli", {"regime": "short", "monitor": "val_acc"})])
    status = {"state": "running", "reason": "worker started", "daemon_pid": None, "attempt": 1,
              "heartbeat": {"step": 221, "epoch": 3, "steps_per_s": 2.0, "time": 0, "monitor": "val_acc",
                            "best": 0.891},
              "policy": {k: policy.values[k] for k in ("regime", "monitor", "mode", "resume", "keep", "save")},
              "policy_known": True}
    text = format_status(status, now=10)
    assert "step 221, epoch 3" in text
    assert "best so far:     val_acc 0.891" in text
    assert "policy:          short: monitor val_acc (auto), save every 1 epochs, on improvement, keep last 1, " \
           "best 1, resume latest" in text
