"""Getting the model out of a run: which checkpoint ("best" by the run's stored policy, "latest", a
step), and the model's own tensors from it, by the names its state_dict uses (no `model.` prefix).

Framework-free: `savegame export` uses it from the command line, and the frameworks' load_weights()
give it their own buffers. Every byte is checked against the manifest; nothing is unpickled.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

from savegame.errors import CheckpointNotFound, ConfigError, CorruptCheckpoint
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.worker.adapter import CheckpointReader
from savegame.worker.codec import DICT, TENSOR
from savegame.worker.safetensors_io import TensorInfo

Which = Union[str, int]


def open_run(path: str, storage_options: Optional[dict[str, Any]] = None) -> CheckpointStore:
    """The store of an existing run folder or URL (a missing one is a configuration error)."""
    store = CheckpointStore(path, storage_options)
    if not store.exists():
        raise ConfigError(f"{store.url} does not exist; check the path (or the bucket name)")
    return store


def choose_checkpoint(store: CheckpointStore, which: Which = "best", monitor: Optional[str] = None,
                      mode: Optional[str] = None) -> CheckpointInfo:
    """"best" (by `monitor`/`mode`, else by the run's stored policy), "latest", or a step number."""
    from savegame.config import Layer, build_config
    from savegame.policy import read_policy
    from savegame.strategies import resume_candidates

    if isinstance(which, int) and not isinstance(which, bool):
        return store.get(which)
    if which not in ("best", "latest"):
        raise ConfigError(f"which must be 'best', 'latest' or a step number, not {which!r}")
    stored = read_policy(store)
    given = {k: v for k, v in (("monitor", monitor), ("mode", mode)) if v is not None}
    config = build_config(([stored] if stored else []) + [Layer("load_weights(...)", given)])
    if which == "best" and config.monitor is None:
        raise ConfigError(f"{store.url}: which='best' needs monitor=... (the run's stored policy names no "
                          "metric); or use which='latest'")
    candidates = resume_candidates(store.list(), which, *(config.monitor or (None, "max")))
    if not candidates:
        raise CheckpointNotFound(f"{store.url}: no committed checkpoint"
                                 + (f" holds {config.monitor[0]}" if which == "best" and config.monitor else ""))
    return candidates[0]


def module_names(reader: CheckpointReader) -> list[str]:
    """The tracked objects that are models (nn.Module state_dicts): recorded since savegame 0.1 adds
    "modules"; older checkpoints: every object whose state is a flat dict of tensors."""
    adapter = reader.state.get("adapter", {})
    recorded = adapter.get("modules")
    if isinstance(recorded, list):
        return [str(name) for name in recorded]
    objects = adapter.get("objects", {})
    return [name for name, encoded in objects.items() if _flat_tensors(encoded) is not None]


def _flat_tensors(encoded: Any) -> Optional[dict[str, str]]:
    """{key: tensor name} when `encoded` is a dict holding tensors only, else None."""
    if not isinstance(encoded, dict) or set(encoded) != {DICT} or not isinstance(encoded[DICT], dict):
        return None
    out = {}
    for key, value in encoded[DICT].items():
        if not (isinstance(value, dict) and set(value) == {TENSOR} and isinstance(value[TENSOR], str)):
            return None
        out[key] = value[TENSOR]
    return out or None


def pick_module(reader: CheckpointReader, name: Optional[str]) -> str:
    names = module_names(reader)
    if name is None:
        name = "model" if "model" in names else (names[0] if len(names) == 1 else None)
        if name is None:
            raise ConfigError(f"{reader.info.path} holds {len(names)} models ({', '.join(names) or 'none'}): "
                              "say which one (--object NAME, or name=...)")
    if name not in reader.state.get("adapter", {}).get("objects", {}):
        raise ConfigError(f"{reader.info.path} holds no object {name!r} (it holds {', '.join(names) or 'no model'})")
    return name


def read_module(reader: CheckpointReader, name: str,
                allocate: Callable[[str, TensorInfo], memoryview]) -> list[tuple[str, TensorInfo]]:
    """Stream one tracked model's tensors into the buffers `allocate(key, info)` gives, checking the
    file's checksum; returns [(state_dict key, info)] in the saved order."""
    skeleton = _flat_tensors(reader.state.get("adapter", {}).get("objects", {}).get(name))
    if skeleton is None:
        raise ConfigError(f"{reader.info.path}: {name!r} is not a model's state_dict (a flat dict of tensors)")
    key_of = {tensor: key for key, tensor in skeleton.items()}
    found: list[tuple[str, TensorInfo]] = []

    def route(info: TensorInfo) -> memoryview:
        key = key_of.get(info.name)
        if key is not None:
            found.append((key, info))
            return allocate(key, info)
        # Read (and hashed: the checksum covers the whole file) into a buffer of its own, then
        # dropped; never a shared one: the hasher thread may still be reading the previous tensor.
        return memoryview(bytearray(info.nbytes))

    def check(infos: list[TensorInfo]) -> None:
        missing = sorted(set(key_of) - {i.name for i in infos})
        if missing:
            raise CorruptCheckpoint(f"{reader.info.path}: tensors {missing[:3]} are missing from state.safetensors")

    reader.read_tensors(route, check)
    order = {tensor: i for i, tensor in enumerate(skeleton.values())}
    return sorted(found, key=lambda item: order[skeleton[item[0]]])

