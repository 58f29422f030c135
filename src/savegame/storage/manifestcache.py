"""Manifests already read from a bucket, kept by (path, ETag), in memory and in the user's cache folder.

Listing a bucket costs one GET per manifest, and on a busy client (or a moto server) that is most
of the time `ls` takes. A committed manifest never changes: it is written create-only, and a later
commit of the same step (after a delete) is a new object with a new ETag. So a manifest whose path
and ETag are both in the listing can be taken from the cache. The cached bytes still go through
parse_manifest like any others; a cache file that does not parse is ignored, never trusted.

Folder: $SAVEGAME_CACHE_DIR, else $XDG_CACHE_HOME/savegame, else ~/.cache/savegame (mode 0700);
SAVEGAME_CACHE_DIR=off keeps the cache in memory only.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Mapping, Optional

from savegame.errors import MalformedInput
from savegame.files import replace_file
from savegame.untrusted import load_json, read_regular_file

CACHE_MAX = 64 << 20  # bytes of one cache file
KEEP_FILES = 64  # cache files kept (one per bucket root), the least recently written go first


def cache_folder() -> Optional[str]:
    chosen = os.environ.get("SAVEGAME_CACHE_DIR")
    if chosen == "off":
        return None
    if chosen:
        return chosen
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "savegame")


class ManifestCache:
    def __init__(self, root_url: str) -> None:
        folder = cache_folder()
        name = hashlib.sha256(root_url.encode()).hexdigest()[:32] + ".json"
        self._path = os.path.join(folder, "manifests", name) if folder else None
        self._entries: dict[str, tuple[str, bytes]] = self._load()
        self._dirty = False

    def lookup(self, wanted: Mapping[str, str]) -> dict[str, bytes]:
        """path -> bytes for each wanted path whose ETag matches the cached one."""
        return {path: entry[1] for path, etag in wanted.items()
                if etag and (entry := self._entries.get(path)) is not None and entry[0] == etag}

    def update(self, read: Mapping[str, tuple[str, bytes]], listed: Mapping[str, str]) -> None:
        """Remember what was just read (path -> (etag, bytes)); forget what is no longer listed."""
        for path, (etag, data) in read.items():
            if etag and self._entries.get(path) != (etag, data):
                self._entries[path] = (etag, data)
                self._dirty = True
        for path in [p for p in self._entries if p not in listed]:
            del self._entries[path]
            self._dirty = True
        if self._dirty:
            self._save()
            self._dirty = False

    def _load(self) -> dict[str, tuple[str, bytes]]:
        if self._path is None:
            return {}
        try:
            data = load_json(read_regular_file(self._path, CACHE_MAX), what=self._path, max_bytes=CACHE_MAX, max_depth=4)
        except (OSError, MalformedInput):
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("format") == 1 else None
        if not isinstance(entries, dict):
            return {}
        return {path: (entry[0], entry[1].encode()) for path, entry in entries.items()
                if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)}

    def _save(self) -> None:
        """Write the cache file atomically; a cache that cannot be written is only slower."""
        if self._path is None:
            return
        entries = {}
        for path, (etag, data) in self._entries.items():
            with contextlib.suppress(UnicodeDecodeError):
                entries[path] = [etag, data.decode("utf-8")]
        folder = os.path.dirname(self._path)
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(os.path.dirname(folder)), exist_ok=True)
            for path in (os.path.dirname(folder), folder):  # private: run ids, metrics, bucket layout
                with contextlib.suppress(FileExistsError):
                    os.mkdir(path, 0o700)
            replace_file(self._path, json.dumps({"format": 1, "entries": entries}).encode(), mode=0o600)
            _trim(folder)


def _trim(folder: str) -> None:
    files = []
    for entry in os.scandir(folder):
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                files.append((entry.stat(follow_symlinks=False).st_mtime, entry.path))
    for _mtime, path in sorted(files)[:-KEEP_FILES]:
        with contextlib.suppress(OSError):
            os.unlink(path)
