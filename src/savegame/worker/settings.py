"""What a Checkpointer starts from: its folder, its settings (the script's arguments merged with the
daemon's), and the checkpoints it may resume from. Functions of their inputs and the environment."""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Optional

from savegame import protocol
from savegame.config import Layer, RunConfig, build_config
from savegame.errors import ConfigError, MalformedInput, StorageError
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.strategies import resume_candidates
from savegame.untrusted import load_json, read_regular_file

log = logging.getLogger("savegame.worker")
MAX_SETTINGS_BYTES = 1 << 20


def choose_dir(given: Optional[str]) -> str:
    """The script's folder, else the daemon's ($SAVEGAME_DIR), else ./checkpoints; they must agree."""
    env_dir = os.environ.get(protocol.ENV_DIR)
    if given and env_dir and os.path.abspath(given) != os.path.abspath(env_dir):
        raise ConfigError(f"the script saves to {given}, but `savegame run` watches {env_dir}: "
                          f"leave the script's folder unset (it defaults to $SAVEGAME_DIR) or run "
                          f"`savegame run --dir {given}`")
    return given or env_dir or "./checkpoints"


def load_config(args: Mapping[str, Any], stored: Optional[Layer] = None,
                defaults: Optional[Mapping[str, Any]] = None) -> RunConfig:
    """Checkpointer(...)'s arguments over its defaults (an adapter's: dropped when a higher layer
    chooses a regime) over the run's stored policy (run on its own), under the daemon's settings
    ($SAVEGAME_CONFIG) when supervised."""
    script: dict[str, Any] = {k: args[k] for k in ("monitor", "regime") if args[k] is not None}
    if args["monitor"] is not None:
        script["mode"] = args["mode"]
    save = {k: args[k] for k in ("every_steps", "every_epochs", "every_seconds", "min_delta") if args[k] is not None}
    keep = {name: args[f"keep_{name}"] for name in ("last", "best") if args[f"keep_{name}"] is not None}
    layers = [] if stored is None else [stored]
    if defaults:
        layers.append(Layer("the script's defaults", dict(defaults), default=True))
    layers.append(Layer("Checkpointer(...)", {**script, **({"save": save} if save else {}),
                                              **({"keep": keep} if keep else {}),
                                              **({"rollback": dict(args["rollback"])} if args.get("rollback") else {})}))
    config_path = os.environ.get(protocol.ENV_CONFIG)
    if config_path:
        try:
            settings = load_json(read_regular_file(config_path, MAX_SETTINGS_BYTES), what=config_path,
                                 max_bytes=MAX_SETTINGS_BYTES)
        except (OSError, MalformedInput) as exc:
            raise ConfigError(f"cannot read the daemon's settings ({config_path}): {exc}") from None
        layers.append(Layer(f"daemon settings ({config_path})", settings))
    return build_config(layers)


def stored_policy(folder: str, supervised: bool) -> Optional[Layer]:
    """A standalone run's policy as stored with its checkpoints (the daemon reads its own), after
    checking that the folder is one to trust (ours, not writable by others)."""
    if supervised or not os.path.isdir(folder):
        return None
    from savegame.policy import read_policy
    from savegame.storage.local import check_run_folder

    check_run_folder(folder)
    return read_policy(CheckpointStore(folder))


def positive_int(name: str, value: Any) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{name} = {value!r}: must be a positive integer (or None: unknown)")
    return value


def resume_sources(store: CheckpointStore, config: RunConfig,
                   supervised: bool) -> list[tuple[CheckpointStore, CheckpointInfo]]:
    """The checkpoints to try, in order: the daemon's choice only (none: a fresh start), or on its
    own the folder's valid checkpoints ranked by the resume setting (after collecting stale staging)."""
    chosen = os.environ.get(protocol.ENV_RESUME_FROM)
    if supervised or chosen:
        if not chosen:
            return []  # the daemon chose a fresh start
        source = CheckpointStore(os.path.dirname(os.path.abspath(chosen)))
        name = os.path.basename(os.path.abspath(chosen))
        scan = source.scan()
        found = [c for c in scan.committed if c.name == name]
        if not found:
            why = [p.problem for p in scan.damaged if p.name == name]
            log.error("asked to resume from %s, which is not a committed checkpoint%s", chosen,
                      f": {why[0]}" if why else "")
            raise SystemExit(protocol.EXIT_BAD_CHECKPOINT)
        return [(source, found[0])]
    try:
        store.collect_garbage()
    except StorageError as exc:  # a planted link, an unreadable folder: say so, never act through it
        log.warning("cannot collect stale staging in %s: %s", store.url, exc)
    monitor = config.monitor
    scan = store.scan()
    for problem in scan.damaged:
        log.warning("not resuming from %s: %s", store.path_of(problem.name), problem.problem)
    ranked = resume_candidates(scan.committed, config["resume"], *(monitor or (None, "max")))
    return [(store, info) for info in ranked]
