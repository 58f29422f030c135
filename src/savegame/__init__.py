"""savegame: keeps long training runs alive across crashes, OOM kills, reboots and preemptions.

The package root stays light (no framework imports): the daemon and the CLI import it too.
"""
from savegame.errors import (CheckpointExists, CheckpointNotFound, ConfigError, CorruptCheckpoint,
                             SavegameError, StorageError, UnsupportedFormat)

__version__ = "0.1.0"

__all__ = ["CheckpointExists", "CheckpointNotFound", "ConfigError", "CorruptCheckpoint", "SavegameError",
           "StorageError", "UnsupportedFormat", "__version__"]


def __getattr__(name: str) -> object:
    # The worker API loads on first use, so the daemon and the CLI never pay for it.
    if name == "Checkpointer":
        from savegame.worker.checkpointer import Checkpointer

        return Checkpointer
    raise AttributeError(f"module 'savegame' has no attribute {name!r}")
