"""Mechanism: a crash-safe checkpoint store over local disk or any fsspec URL."""
from savegame.storage.location import Location, parse_location, redact
from savegame.storage.manifest import FileEntry, Manifest, folder_name, step_of_folder
from savegame.storage.store import (CheckpointInfo, CheckpointStore, HashingWriter, Problem, Scan,
                                    StagedCheckpoint, copy_checkpoint)

__all__ = ["CheckpointInfo", "CheckpointStore", "FileEntry", "HashingWriter", "Location", "Manifest",
           "Problem", "Scan", "StagedCheckpoint", "copy_checkpoint", "folder_name", "parse_location",
           "redact", "step_of_folder"]
