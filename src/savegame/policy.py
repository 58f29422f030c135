"""The run's policy, stored with its checkpoints: what retention keeps and what "best" means.

One small record per run root, `.savegame/policy.json`, in the run folder and in the bucket:

    {"format": 1, "regime": "normal", "monitor": "val_acc", "mode": "max",
     "keep": {"last": 10, "best": 1, ...}, "mirror_keep": {...}}

It is written once the policy is settled (the daemon, when its worker has reported its own
Checkpointer settings; a standalone worker, at its start) and read by every reader of retention
before it acts: the daemon at start, the mirror, `ls`, `prune`, `restore --best`, `run --resume
best`, a standalone worker. It is the lowest layer of settings (a script's, the config file's and
the command line's own values win). Without it, and before the worker reports, the policy is
unknown and no retention runs.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

from savegame.config import Layer, RunConfig, validate_layer
from savegame.errors import ConfigError, MalformedInput, SavegameError, StorageError
from savegame.files import replace_file
from savegame.storage import CheckpointStore
from savegame.untrusted import load_json, obj, read_regular_file

log = logging.getLogger("savegame")
POLICY_PATH = ".savegame/policy.json"
POLICY_KEYS = ("regime", "monitor", "mode", "keep", "mirror_keep")
POLICY_FORMAT = 1
MAX_POLICY_BYTES = 64 * 1024


def policy_record(config: RunConfig) -> dict[str, Any]:
    """The record of an effective configuration (the keys retention and "best" depend on)."""
    values = config.values
    record: dict[str, Any] = {"format": POLICY_FORMAT}
    record.update({key: values[key] for key in POLICY_KEYS if values.get(key) is not None})
    for tier in ("keep", "mirror_keep"):  # thinning tiers in the form the config accepts
        if tier in record:
            record[tier] = {**record[tier], "thin": [
                {"younger_than": "forever" if t["younger_than"] is None else t["younger_than"],
                 "every": t["every"]} for t in record[tier].get("thin", [])]}
    return record


def read_policy(store: CheckpointStore) -> Optional[Layer]:
    """The stored policy of a run root as a settings layer, or None when there is none (or it is
    damaged: then it is as good as unknown, and said so)."""
    where = f"{store.url}/{POLICY_PATH}"
    try:
        raw = _read(store)
    except FileNotFoundError:
        return None
    except (OSError, MalformedInput, SavegameError) as exc:
        if isinstance(exc, OSError) and not isinstance(exc, SavegameError) and _missing(exc):
            return None
        log.warning("cannot read the run's stored policy %s (%s); treating the policy as unknown", where, exc)
        return None
    try:
        record = obj(load_json(raw, what=where, max_bytes=MAX_POLICY_BYTES, max_depth=6), where)
        values = {key: record[key] for key in POLICY_KEYS if key in record}
        layer = Layer(f"the run's stored policy ({where})", values)
        validate_layer(layer)
    except (MalformedInput, ConfigError) as exc:
        log.warning("ignoring a damaged stored policy: %s", exc)
        return None
    return layer


def write_policy(store: CheckpointStore, config: RunConfig) -> None:
    """Store the policy with the checkpoints (atomically on local disk). StorageError on failure."""
    data = json.dumps(policy_record(config), indent=1, sort_keys=True).encode()
    try:
        if store.is_local:
            _write_local(os.path.join(store.location.path, POLICY_PATH), data)
        else:
            backend = store._backend  # noqa: SLF001 - one small object beside the checkpoints
            backend.fs.pipe_file(backend.full(POLICY_PATH), data)
    except Exception as exc:  # noqa: BLE001 - the storage boundary: OSError, botocore, aiohttp
        raise StorageError(f"{store.url}: cannot store the run's policy: {exc}") from None


def update_policy(store: CheckpointStore, config: RunConfig) -> bool:
    """Store the policy unless the store already holds the same; True when it wrote. StorageError."""
    from savegame.config import build_config

    stored = read_policy(store)
    if stored is not None and policy_record(build_config([stored])) == policy_record(config):
        return False
    write_policy(store, config)
    return True


def _read(store: CheckpointStore) -> bytes:
    if store.is_local:
        return read_regular_file(os.path.join(store.location.path, POLICY_PATH), MAX_POLICY_BYTES)
    backend = store._backend  # noqa: SLF001
    path = backend.full(POLICY_PATH)
    try:
        size = backend.fs.size(path)
        if size is not None and size > MAX_POLICY_BYTES:
            raise MalformedInput(f"{path}: {size} bytes, more than the {MAX_POLICY_BYTES} allowed")
        return backend.fs.cat_file(path)
    except (FileNotFoundError, MalformedInput):
        raise
    except Exception as exc:  # noqa: BLE001 - the storage boundary
        raise StorageError(f"{store.url}: cannot read the run's policy: {exc}") from None


def _missing(exc: OSError) -> bool:
    import errno

    return exc.errno in (errno.ENOENT, errno.ENOTDIR)


def _write_local(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, data, durable=True)
