"""The small exception hierarchy every part of savegame raises.

Backend errors (OSError from the OS, botocore errors, fsspec errors) are mapped to these at the
storage boundary, so callers only ever catch savegame's own types.
"""
from __future__ import annotations


class SavegameError(Exception):
    """Base of every error savegame raises on purpose."""


class ConfigError(SavegameError, ValueError):
    """Bad configuration or usage: a wrong key, value, URL, or a missing optional package.

    The CLI turns it into exit code 78 (EX_CONFIG) and never retries it.
    """


class MalformedInput(SavegameError, ValueError):
    """Data from outside (a manifest, a datagram, a status file) that does not parse or validate."""


class StorageError(SavegameError, OSError):
    """A storage operation failed (I/O error, disk full, unreachable server)."""


class CheckpointNotFound(StorageError, LookupError):
    """No committed checkpoint matches the request (unknown step, empty run)."""


class CheckpointExists(StorageError, FileExistsError):
    """A committed checkpoint already holds this step."""


class CorruptCheckpoint(StorageError):
    """A checkpoint failed verification: a missing, truncated or altered file, or a bad manifest."""


class UnsupportedFormat(CorruptCheckpoint):
    """A manifest or payload of a format this version does not read (newer, or unsafe like pickle)."""


class Cancelled(SavegameError):
    """An operation stopped on purpose before it finished (e.g. an upload set aside for an urgent one)."""
