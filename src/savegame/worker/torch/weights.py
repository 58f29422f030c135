"""The model out of a run, for inference or fine-tuning, without unpickling anything:

    info = savegame.torch.load_weights(model, "runs/mnist", which="best", map_location="cpu")

"best" follows the run's stored policy (its monitor and mode), "latest" is the newest committed
checkpoint, an int is a step. Tensors are read into fresh CPU memory, checked against the
manifest's checksum as they stream, then placed on `map_location`: a checkpoint saved from a GPU
loads on a CPU-only machine. A model built on the "meta" device (no memory) gets the loaded tensors
assigned. Loading never installs signal handlers (only training does).
"""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from savegame.errors import ConfigError
from savegame.storage import CheckpointInfo
from savegame.worker.adapter import CheckpointReader
from savegame.worker.safetensors_io import TensorInfo
from savegame.worker.torch.buffers import TORCH_DTYPES, bytes_view
from savegame.worker.weights import Which, choose_checkpoint, open_run, pick_module, read_module

Device = Union[str, torch.device, None]


def load_state_dict(path: str, which: Which = "best", map_location: Device = "cpu", *, name: Optional[str] = None,
                    monitor: Optional[str] = None, mode: Optional[str] = None,
                    storage_options: Optional[dict[str, Any]] = None) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """(the tracked model's state_dict, the checkpoint it came from); keys as model.state_dict() has them."""
    store = open_run(path, storage_options)
    info = choose_checkpoint(store, which, monitor, mode)
    reader = CheckpointReader(store, info)
    tensors: dict[str, torch.Tensor] = {}

    def allocate(key: str, meta: TensorInfo) -> memoryview:
        tensors[key] = torch.empty(meta.shape, dtype=TORCH_DTYPES[meta.dtype])
        return memoryview(bytes_view(tensors[key]).numpy())

    order = read_module(reader, pick_module(reader, name), allocate)
    state = {key: tensors[key] for key, _meta in order}
    if map_location is not None and torch.device(map_location).type != "cpu":
        state = {key: t.to(map_location) for key, t in state.items()}
    return state, info


def load_weights(model: torch.nn.Module, path: str, which: Which = "best", map_location: Device = "cpu", *,
                 name: Optional[str] = None, strict: bool = True, monitor: Optional[str] = None,
                 mode: Optional[str] = None, storage_options: Optional[dict[str, Any]] = None) -> CheckpointInfo:
    """Load a run's model weights into `model` (verified, never unpickled); returns the checkpoint used.

    `name`: the name the model was tracked under (default "model", or the only model tracked)."""
    state, info = load_state_dict(path, which, map_location, name=name, monitor=monitor, mode=mode,
                                  storage_options=storage_options)
    on_meta = any(t.device.type == "meta" for t in model.state_dict().values())
    try:
        # load_state_dict copies into the model's own tensors (their devices); a meta model has none.
        model.load_state_dict(state, strict=strict, assign=on_meta)
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ConfigError(f"{info.path}: does not fit this model: {' '.join(str(exc).split())[:300]}") from None
    return info
