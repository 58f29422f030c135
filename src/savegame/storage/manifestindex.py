"""A bucket's manifest index: one object holding every committed manifest's bytes and ETag.

A cold listing of a bucket costs one GET per manifest (1,000 checkpoints: seconds). The mirror, the
one writer of a run's bucket prefix, rewrites `.savegame/manifests.json` after each change; a
listing that would read many manifests GETs that one object instead, and takes from it only what
the real listing confirms: the folder's manifest is listed now with the very ETag the index holds,
and where that ETag is an MD5 (S3 single-part uploads, which manifests are), the bytes hash to it.
Everything else (a manifest the index lacks or holds under another ETag, bytes that do not match,
an index that does not parse) is read from the manifest itself. Taken bytes still go through
parse_manifest, like any others: the index saves requests, it is never trusted more than a manifest.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Mapping, Optional

from savegame.errors import MalformedInput
from savegame.untrusted import load_json

INDEX_PATH = ".savegame/manifests.json"
INDEX_FORMAT = 1
INDEX_MAX = 256 << 20
MIN_INDEXED_READS = 16  # fewer manifests to read: their GETs cost less than a large index
_MD5 = re.compile(r'^"?([0-9a-f]{32})"?$')

Entries = dict[str, tuple[str, bytes]]  # folder name -> (ETag of its manifest, the manifest's bytes)


def render_index(entries: Mapping[str, tuple[str, bytes]]) -> bytes:
    body = {}
    for name, (etag, data) in sorted(entries.items()):
        try:
            body[name] = [etag, data.decode("utf-8")]
        except UnicodeDecodeError:
            continue  # not a manifest savegame wrote: a listing reads it itself (and finds it damaged)
    return json.dumps({"format": INDEX_FORMAT, "entries": body}, separators=(",", ":")).encode()


def parse_index(raw: Optional[bytes]) -> Entries:
    """The entries of an index; nothing at all from one that is malformed (it is only a shortcut)."""
    if not raw:
        return {}
    try:
        data = load_json(raw, what=INDEX_PATH, max_bytes=INDEX_MAX, max_depth=4)
    except MalformedInput:
        return {}
    entries = data.get("entries") if isinstance(data, dict) and data.get("format") == INDEX_FORMAT else None
    if not isinstance(entries, dict):
        return {}
    return {name: (entry[0], entry[1].encode("utf-8")) for name, entry in entries.items()
            if isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)}


def confirmed(entries: Entries, listed: Mapping[str, str]) -> dict[str, bytes]:
    """name -> manifest bytes for each listed manifest (name -> its ETag now) the index holds the same."""
    found = {}
    for name, etag in listed.items():
        entry = entries.get(name)
        if etag and entry is not None and entry[0] == etag and matches_etag(entry[1], etag):
            found[name] = entry[1]
    return found


def matches_etag(data: bytes, etag: str) -> bool:
    """False only when the ETag is an MD5 of the content and `data` is not what it hashes."""
    md5 = _MD5.match(etag)
    return md5 is None or hashlib.md5(data, usedforsecurity=False).hexdigest() == md5.group(1)
