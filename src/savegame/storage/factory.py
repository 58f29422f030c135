"""The backend for a location: local disk or object storage (imported lazily: fsspec loads only for URLs)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Union

from savegame.storage.location import Location

if TYPE_CHECKING:
    from savegame.storage.local import LocalBackend
    from savegame.storage.objectstore import ObjectBackend


def make_backend(location: Location) -> Union["LocalBackend", "ObjectBackend"]:
    if location.is_local:
        from savegame.storage.local import LocalBackend

        return LocalBackend(location)
    from savegame.storage.objectstore import ObjectBackend

    return ObjectBackend(location)
