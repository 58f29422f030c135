"""Which adapter a Checkpointer uses: named, or told from the tracked objects' types.

Each framework's adapter is imported only here and only when chosen (the adapters import the base
types in worker/adapter.py, never this module), so a script pays for the framework it uses alone.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from savegame.errors import ConfigError
from savegame.worker.adapter import Adapter


def make_adapter(framework: Optional[str], objects: Mapping[str, Any]) -> Adapter:
    """The adapter for `framework`, or for the framework of the tracked objects (imported lazily)."""
    name = framework or _detect_framework(objects)
    if name == "torch":
        from savegame.worker.torch.distributed import check_initialized, distributed
        check_initialized()
        if distributed():  # one rank of a torch.distributed job: sharded checkpoints
            from savegame.worker.torch.distributed import join_job
            from savegame.worker.torch.sharded import ShardedTorchAdapter
            return ShardedTorchAdapter(join_job())
        from savegame.worker.torch.adapter import TorchAdapter
        return TorchAdapter()
    if name == "keras":
        from savegame.worker.keras.adapter import KerasAdapter
        return KerasAdapter()
    if name == "numpy":
        from savegame.worker.numpy import NumpyAdapter
        return NumpyAdapter()
    if name == "tensorflow":
        from savegame.worker.tensorflow.adapter import TensorFlowAdapter
        return TensorFlowAdapter()
    raise ConfigError(f"unknown framework {name!r}; use torch, keras, tensorflow or numpy")


def _detect_framework(objects: Mapping[str, Any]) -> str:
    for obj in objects.values():
        module = type(obj).__module__.split(".")[0]
        if module in ("torch", "keras", "tensorflow", "numpy"):
            return module
        for base in type(obj).__mro__:
            root = base.__module__.split(".")[0]
            if root in ("torch", "keras", "tensorflow"):
                return root
    raise ConfigError("cannot tell the framework of the tracked objects; pass framework='torch' (or keras, tensorflow)")
