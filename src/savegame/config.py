"""Configuration: a TOML file, command-line flags and script defaults, validated in one place.

Layers merge low to high (regime preset < script defaults < script arguments < config file < command
line; a script's default schedule and retention give way when a higher layer chooses a regime), each
checked against the schema below. A bad key or value raises ConfigError naming the source, the
key, the value and what is allowed. The rest of the code only sees `RunConfig` and the policy
objects it builds.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping, Optional, Sequence

from savegame.errors import ConfigError, MalformedInput
from savegame.see.settings import KEYS as SEE_KEYS
from savegame.strategies import (REGIMES, RESUME_CHOICES, AnyOf, AnySchedule, EveryNEpochs, EveryNSeconds,
                                 EveryNSteps, KeepBest, KeepEvery, KeepLast, KeepThinning, OnImprovement,
                                 RestartPolicy, ThinningTier, resolve_mode)
from savegame.strategies.anomaly import KINDS as ANOMALY_KINDS, RollbackRule
from savegame.strategies.interval import BOOTSTRAP_S
from savegame.strategies.regimes import DEFAULT_REGIME

from savegame.untrusted import read_regular_file

import tomllib

MAX_CONFIG_BYTES = 1 << 20

Parser = Callable[[Any], Any]
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


MAX_COUNT = 10**9
MAX_DURATION_S = 366 * 86400.0  # a year: longer "durations" are mistakes (or inf), not settings
MAX_WAIT_S = 86400.0  # what the daemon itself waits for (grace, deadlines, backoff): a day at most


def _integer(minimum: int = 0) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        if value > MAX_COUNT:
            raise ValueError(f"must be at most {MAX_COUNT}")
        return value
    return parse


def _int_between(low: int, high: int) -> Parser:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"must be an integer from {low} to {high}")
        return value
    return parse


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError("must be a finite number >= 0")
    return float(value)


def duration(value: Any, maximum: float = MAX_DURATION_S) -> float:
    """Seconds from a number or a string like '30s', '10m', '2h', '1d'; finite, at most `maximum`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        seconds = float(value) if value <= maximum else float("inf")  # float(10**400) would overflow
    else:
        match = _DURATION_RE.match(value) if isinstance(value, str) else None
        if not match:
            raise ValueError("must be a duration: seconds, or a string like '30s', '10m', '2h', '1d'")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if not seconds <= maximum:  # also false for NaN
        raise ValueError(f"must be at most {_human_seconds(maximum)}")
    return seconds


def _wait(value: Any) -> float:
    return duration(value, MAX_WAIT_S)


def _human_seconds(seconds: float) -> str:
    return f"{seconds / 86400:g} days" if seconds >= 86400 else f"{seconds:g} seconds"


def _hang_timeout(value: Any) -> Any:
    if value == "auto":
        return value
    try:
        return duration(value)
    except ValueError as exc:
        raise ValueError(f'must be "auto" or a duration (0: off); {exc}') from None


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _choice(*allowed: str) -> Parser:
    def parse(value: Any) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return value
    return parse


def _command(value: Any) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a non-empty list of strings, like [\"python\", \"train.py\"]")
    return value


def _thin(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError('must be a list like [{younger_than = "1d", every = "1h"}]')
    out = []
    for tier in value:
        if not isinstance(tier, dict) or set(tier) != {"younger_than", "every"}:
            raise ValueError('each tier must be {younger_than = "1d", every = "1h"} ("forever" for no limit)')
        limit = None if tier["younger_than"] in ("forever", None) else duration(tier["younger_than"])
        every = duration(tier["every"])
        if every <= 0:
            raise ValueError("a tier's 'every' must be more than 0")
        out.append({"younger_than": limit, "every": every})
    return out


def _preemption(value: Any) -> str:
    if value in ("aws", "gcp", "azure") or (isinstance(value, str) and value.startswith(("http://", "https://"))):
        return value
    raise ValueError("must be aws, gcp, azure or an http(s) URL of a notice")


def _every_seconds(value: Any) -> Any:
    """A duration, or "auto": the Young-Daly interval from measured save costs and failures."""
    if value == "auto":
        return value
    try:
        return duration(value)
    except ValueError as exc:
        raise ValueError(f'{exc}, or "auto"') from None


def _positive_duration(value: Any) -> float:
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError("must be a duration more than 0")
    return seconds


def _anomaly_kinds(value: Any) -> list[str]:
    if not isinstance(value, list) or any(v not in ANOMALY_KINDS for v in value):
        raise ValueError(f"must be a list of {', '.join(ANOMALY_KINDS)} (empty: off)")
    return list(dict.fromkeys(value))


def _spike_factor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1 < value < float("inf"):
        raise ValueError("must be a finite number more than 1")
    return float(value)


PREEMPTION_SIGNALS = ("SIGUSR1", "SIGUSR2")


def _preemption_signal(value: Any) -> str:
    name = value.upper() if isinstance(value, str) else value
    name = f"SIG{name}" if isinstance(name, str) and not name.startswith("SIG") else name
    if name not in PREEMPTION_SIGNALS:
        raise ValueError("must be SIGUSR1 or SIGUSR2 (what #SBATCH --signal sends)")
    return name


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError("must be an http(s) URL, like \"http://169.254.169.254\"")
    return value.rstrip("/")


def _at_least(minimum: float, parse: Parser) -> Parser:
    def check(value: Any) -> float:
        parsed = parse(value)
        if parsed < minimum:
            raise ValueError(f"must be at least {minimum:g} seconds")
        return parsed
    return check


NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _node_name(value: Any) -> str:
    if not isinstance(value, str) or not NODE_NAME.fullmatch(value):
        raise ValueError("must be a name of letters, digits, '-' and '_' (at most 64)")
    return value


def _table(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a table of options")
    return dict(value)


SAVE_KEYS: dict[str, Parser] = {
    "every_steps": _integer(), "every_epochs": _integer(), "every_seconds": _every_seconds,
    "on_improvement": _boolean, "min_delta": _number, "mtbf_prior": _positive_duration,
}
ROLLBACK_KEYS: dict[str, Parser] = {
    "on": _anomaly_kinds, "spike_factor": _spike_factor, "window": _integer(1), "max": _integer(),
    "skip_batches": _boolean,
}
KEEP_KEYS: dict[str, Parser] = {
    "last": _integer(), "best": _integer(), "every": _integer(), "every_unit": _choice("step", "epoch"),
    "thin": _thin,
}
TOP_KEYS: dict[str, Parser] = {
    "dir": _text, "mirror": _text, "regime": _choice(*REGIMES), "resume": _choice(*RESUME_CHOICES),
    "monitor": _text, "mode": _choice("min", "max", "auto"), "grace": _wait,
    "max_restarts": _integer(), "restart_window": duration, "backoff_initial": _wait,
    "backoff_max": _wait, "hang_timeout": _hang_timeout, "hang_floor": duration, "stale_after": duration,
    "mirror_deadline": _wait, "upload_timeout": _wait, "mirror_wait": _wait, "preemption": _preemption,
    "preemption_interval": _at_least(0.5, _wait), "command": _command, "storage": _table,
    "nodes": _integer(1), "node": _node_name, "leader": _boolean,  # a job on several nodes (daemon/nodes.py)
    "preemption_signal": _preemption_signal, "preemption_endpoint": _endpoint,
    "worker_oom_score_adj": _int_between(-1000, 1000),
    "shared_memory": _boolean,  # hand saves over to the daemon through /dev/shm (daemon/handover.py)
    **SEE_KEYS,  # metrics, metrics_textfile
}
SECTIONS: dict[str, dict[str, Parser]] = {"save": SAVE_KEYS, "keep": KEEP_KEYS, "mirror_keep": KEEP_KEYS,
                                          "rollback": ROLLBACK_KEYS}
PRESET_SECTIONS = ("save", "keep", "mirror_keep")  # what a regime's preset decides
DEFAULTS: dict[str, Any] = {
    "resume": "latest", "mode": "auto", "grace": 25.0, "max_restarts": 5, "restart_window": 3600.0,
    "backoff_initial": 1.0, "backoff_max": 60.0, "hang_timeout": "auto", "hang_floor": 1800.0, "stale_after": 3600.0,
    "mirror_deadline": 60.0, "upload_timeout": 600.0, "mirror_wait": 300.0, "preemption_interval": 5.0,
    "save": {"min_delta": 0.0, "mtbf_prior": 86400.0}, "keep": {"every_unit": "step"},
    "rollback": {"on": [], "spike_factor": 10.0, "window": 100, "max": 3, "skip_batches": False},
    "shared_memory": False,  # opt-in: 2 more state-sized copies in RAM, commits on the daemon's loop
    "worker_oom_score_adj": 0,  # the worker does not inherit the daemon's protection (OOMScoreAdjust=-500)
}


@dataclass(frozen=True)
class Layer:
    """One source of settings and its name, for error messages."""

    source: str
    values: Mapping[str, Any]
    # A script's (or an adapter's) defaults, as opposed to its explicit arguments: they hold over the
    # regime's preset, but their [save] and [keep] give way when a higher layer chooses a regime.
    default: bool = False


def validate_layer(layer: Layer) -> dict[str, Any]:
    """Check every key and value of one layer; return the parsed values."""
    parsed: dict[str, Any] = {}
    for key, value in layer.values.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{layer.source}: [{key}] must be a table, not {value!r}")
            parsed[key] = {k: _parse_one(layer.source, SECTIONS[key], k, v, prefix=f"{key}.")
                           for k, v in value.items()}
        else:
            parsed[key] = _parse_one(layer.source, TOP_KEYS, key, value)
    return parsed


def _parse_one(source: str, schema: Mapping[str, Parser], key: str, value: Any, prefix: str = "") -> Any:
    if key not in schema:
        allowed = sorted(schema) + ([] if prefix else sorted(SECTIONS))
        hint = difflib.get_close_matches(key, allowed, n=1)
        suggestion = f" (did you mean {prefix + hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{source}: unknown key {prefix + key!r}{suggestion}; allowed: {', '.join(allowed)}")
    try:
        return schema[key](value)
    except (ValueError, OverflowError) as exc:
        shown = "<hidden>" if key == "storage" else repr(value)
        raise ConfigError(f"{source}: {prefix}{key} = {shown}: {exc}") from None


def _merge(low: dict[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        if key in SECTIONS and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


@dataclass(frozen=True)
class RunConfig:
    """Validated settings, and the policy objects they stand for."""

    values: Mapping[str, Any]
    explicit: Mapping[str, Any] = field(default_factory=dict)  # what the user set (not defaults)

    def __getitem__(self, key: str) -> Any:
        return self.values.get(key)

    @property
    def regime(self) -> str:
        return self.values["regime"]

    @property
    def monitor(self) -> Optional[tuple[str, str]]:
        metric = self.values.get("monitor")
        return (metric, resolve_mode(self.values["mode"], metric)) if metric else None

    @property
    def auto_interval(self) -> bool:
        return self.values["save"]["every_seconds"] == "auto"

    def schedule(self, auto_seconds: Optional[float] = None) -> AnySchedule:
        """The save schedule; with every_seconds = "auto", at `auto_seconds` (the worker measures it)."""
        save = self.values["save"]
        seconds = (auto_seconds or BOOTSTRAP_S) if self.auto_interval else save["every_seconds"]
        parts: list[Any] = [EveryNSteps(save["every_steps"]), EveryNEpochs(save["every_epochs"]),
                            EveryNSeconds(seconds)]
        if self.monitor and save["on_improvement"]:
            parts.append(OnImprovement(self.monitor[0], self.monitor[1], save["min_delta"]))  # type: ignore[arg-type]
        return AnySchedule(tuple(parts))

    def retention(self, tier: str = "local") -> AnyOf:
        keep = self.values["keep" if tier == "local" else "mirror_keep"]
        parts: list[Any] = [KeepLast(keep["last"]), KeepEvery(keep["every"], keep["every_unit"])]
        if self.monitor and keep["best"]:
            parts.append(KeepBest(keep["best"], self.monitor[0], self.monitor[1]))  # type: ignore[arg-type]
        if keep["thin"]:
            parts.append(KeepThinning(tuple(
                ThinningTier(None if t["younger_than"] is None else timedelta(seconds=t["younger_than"]),
                             timedelta(seconds=t["every"])) for t in keep["thin"])))
        return AnyOf(tuple(parts))

    def rollback_rule(self) -> RollbackRule:
        r = self.values["rollback"]
        return RollbackRule(tuple(r["on"]), r["spike_factor"], r["window"], r["max"], r["skip_batches"])

    def restart_policy(self) -> RestartPolicy:
        v = self.values
        return RestartPolicy(max_restarts=v["max_restarts"], window_s=v["restart_window"],
                             backoff_initial_s=v["backoff_initial"], backoff_max_s=v["backoff_max"],
                             max_rollbacks=v["rollback"]["max"])


def build_config(layers: Sequence[Layer]) -> RunConfig:
    """Validate and merge layers (lowest first) over the defaults and the chosen regime's preset."""
    explicit: dict[str, Any] = {}
    for index, layer in enumerate(layers):
        if layer.default and any("regime" in higher.values for higher in layers[index + 1:]):
            # defaults meant for no particular regime give way to a chosen one's schedule and retention
            layer = Layer(layer.source, {k: v for k, v in layer.values.items() if k not in PRESET_SECTIONS})
        explicit = _merge(explicit, validate_layer(layer))
    regime = explicit.get("regime", DEFAULT_REGIME)
    preset = validate_layer(Layer(f"regime {regime!r}", REGIMES[regime]))
    values = _merge(_merge(DEFAULTS, preset), explicit)
    values["regime"] = regime
    values["mirror_keep"] = {**values["keep"], **explicit.get("mirror_keep", {})}
    return RunConfig(values=values, explicit=explicit)


def read_toml(path: str) -> Layer:
    """A config file as a layer; a missing or unparsable file is a ConfigError."""
    try:
        raw = read_regular_file(path, MAX_CONFIG_BYTES, follow_symlinks=True)
        return Layer(f"config {path}", tomllib.loads(raw.decode("utf-8")))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config {path} is nested too deeply to be a savegame config") from None
    except MalformedInput as exc:
        raise ConfigError(f"config {exc}; give a plain TOML file") from None
    except OSError as exc:
        raise ConfigError(f"config {path} cannot be read: {exc.strerror}") from None


def explicit_for_worker(config: RunConfig) -> dict[str, Any]:
    """The settings a worker should apply over its own defaults (never the storage credentials)."""
    keep = ("regime", "monitor", "mode", "save", "keep", "rollback")
    return {k: v for k, v in config.explicit.items() if k in keep}
