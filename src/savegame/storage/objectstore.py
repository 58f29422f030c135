"""Object storage through fsspec: payload under the final prefix, manifest.json last and create-only.

There is no rename, so two writers of one step would write the same payload keys: a writer first
claims the step (storage/objectclaim.py), and a loser never overwrites the winner's payload.
"""
from __future__ import annotations

import errno
import time
import uuid
from typing import Any, BinaryIO, Iterator

from savegame.errors import CheckpointExists
from savegame.storage.backends import QUARANTINE_DIR, FolderEntry, Sink, Staging, StagingEntry
from savegame.storage.location import Location, open_filesystem
from savegame.storage.manifest import MANIFEST_MAX, MANIFEST_NAME, QUARANTINE_NAME, step_of_folder
from savegame.storage.manifestcache import ManifestCache
from savegame.storage.manifestindex import (INDEX_PATH, MIN_INDEXED_READS, Entries, confirmed, parse_index,
                                            render_index)
from savegame.storage.objectclaim import release_claim, take_claim
from savegame.storage.objectread import read_small_objects


class _ObjectSink:
    def __init__(self, fs: Any, path: str) -> None:
        self._file = fs.open(path, "wb", block_size=64 << 20)

    def write(self, data: bytes | memoryview) -> int:
        return self._file.write(memoryview(data).cast("B"))

    def close(self) -> None:
        self._file.close()


class _ObjectStaging:
    def __init__(self, backend: "ObjectBackend", name: str, claim: str) -> None:
        self._backend = backend
        self._name = name
        self.claim = claim  # "": joined (another process holds the claim and commits)
        self._written: list[str] = []
        self.token = name  # no rename: everyone writes under the final prefix

    def open(self, relpath: str) -> Sink:
        path = self._backend.full(f"{self._name}/{relpath}")
        self._written.append(path)
        return _ObjectSink(self._backend.fs, path)

    def commit(self, manifest: bytes) -> None:
        try:
            self._backend.put_create_only(f"{self._name}/{MANIFEST_NAME}", manifest)
        finally:
            release_claim(self.claim)
        self.drop_claim()  # committed: the manifest guards the step now

    def drop_claim(self) -> None:
        release_claim(self.claim)
        try:
            self._backend.fs.rm_file(self.claim)
        except Exception:  # noqa: BLE001 - a claim left in a committed folder is harmless
            pass

    def abort(self) -> None:
        # If another writer committed this step meanwhile, these paths hold its payload now, and
        # removing them would break a committed checkpoint.
        try:
            if self._backend.manifest_exists(self._name):
                return
            for path in [*self._written, self.claim]:  # the claim last: the step stays ours until clean
                try:
                    self._backend.fs.rm_file(path)
                except (FileNotFoundError, OSError):
                    pass
        finally:
            release_claim(self.claim)


class ObjectBackend:
    """A run root on an object store through fsspec (s3://, gs://, memory://, ...)."""

    def __init__(self, location: Location) -> None:
        self.location = location
        self.fs = open_filesystem(location)
        self.root = self.fs._strip_protocol(f"{location.protocol}://{location.path}").rstrip("/")
        self._cache = ManifestCache(f"{location.protocol}://{self.root}")
        self._manifests: Entries = {}  # what the last scan read: folder name -> (ETag, manifest bytes)
        self._index_written: bytes | None = None

    def full(self, relpath: str) -> str:
        return f"{self.root}/{relpath}"

    def ensure_root(self) -> None:
        """Object stores have no folders to create."""

    def root_exists(self) -> bool:
        """Whether the bucket exists; other errors (credentials, options, network) propagate."""
        bucket = self.root.split("/", 1)[0] or self.root
        self.fs.invalidate_cache(bucket)
        try:
            self.fs.info(bucket)
        except FileNotFoundError:
            return False
        return True

    def _forget(self, path: str) -> None:
        """Drop the cached listings of `path` and of everything below it.

        invalidate_cache(path) keeps the listings below `path` (s3fs), and find() never replaces a
        cached listing: a folder listed once before another process committed it would then look
        torn (manifest listed, yet "not found") for as long as this filesystem object lives.
        """
        self.fs.invalidate_cache(path)
        cache = getattr(self.fs, "dircache", None)
        prefix = path.rstrip("/") + "/"
        for key in [k for k in list(cache or ()) if k.startswith(prefix)]:
            cache.pop(key, None)

    def _walk_files(self) -> Iterator[tuple[str, dict[str, Any]]]:
        self._forget(self.root)
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError:
            return
        prefix = self.root.rstrip("/") + "/"
        for path, info in found.items():
            if path.startswith(prefix) and info.get("type", "file") == "file":
                yield path[len(prefix):], info

    def scan(self) -> list[FolderEntry]:
        folders: dict[str, dict[str, Any]] = {}
        tags: dict[str, str] = {}  # manifest path -> its ETag in the listing
        indexed = False
        aside: set[str] = set()
        for rel, info in self._walk_files():
            indexed = indexed or rel == INDEX_PATH
            name, _, inner = rel.partition("/")
            if name == QUARANTINE_DIR and inner:
                aside.add(inner.split("/", 1)[0])
                continue
            if not inner or step_of_folder(name) is None:
                continue
            seen = folders.setdefault(name, {"files": {}, "modified": 0.0})
            seen["files"][inner] = info.get("size")
            seen["modified"] = max(seen["modified"], _info_mtime(info))
            if inner == MANIFEST_NAME and _size_ok(info.get("size")):
                tags[self.full(rel)] = str(info.get("ETag") or info.get("etag") or "")
        contents = self._read_manifests(tags, indexed)
        self._manifests = {self._folder_of(p): (tags[p], data) for p, data in contents.items()
                           if isinstance(data, bytes) and tags[p]}
        moved = [FolderEntry(f"{QUARANTINE_DIR}/{n}", step_of_folder(n.split(".")[0]) or 0, None, None, False, True,
                             None) for n in sorted(aside) if step_of_folder(n.split(".")[0]) is not None]
        return [self._entry(name, seen, contents.get(self.full(f"{name}/{MANIFEST_NAME}")))
                for name, seen in folders.items()] + moved

    def _read_manifests(self, tags: dict[str, str], indexed: bool) -> dict[str, bytes | BaseException]:
        """Each listed manifest: from the cache when its ETag matches, else from the bucket's index
        (when there are many to read and it confirms them), else one GET (concurrently)."""
        cached = self._cache.lookup(tags)
        wanted = {p: etag for p, etag in tags.items() if p not in cached}
        from_index = self._from_index(wanted) if indexed and len(wanted) >= MIN_INDEXED_READS else {}
        read = read_small_objects(self.fs, [p for p in wanted if p not in from_index])
        fresh = {p: (tags[p], data) for p, data in {**read, **from_index}.items() if isinstance(data, bytes)}
        self._cache.update(fresh, tags)
        return {**read, **from_index, **cached}

    def _from_index(self, wanted: dict[str, str]) -> dict[str, bytes]:
        raw = read_small_objects(self.fs, [self.full(INDEX_PATH)]).get(self.full(INDEX_PATH))
        entries = parse_index(raw if isinstance(raw, bytes) else None)
        found = confirmed(entries, {self._folder_of(path): etag for path, etag in wanted.items()})
        return {self.full(f"{name}/{MANIFEST_NAME}"): data for name, data in found.items()}

    def _folder_of(self, path: str) -> str:
        return path[len(self.root) + 1:].split("/", 1)[0]

    def write_index(self) -> bool:
        """Rewrite the manifest index from a fresh listing; False when it would say what it says."""
        self.scan()
        data = render_index(self._manifests)
        if data == self._index_written:
            return False
        self.fs.pipe_file(self.full(INDEX_PATH), data)
        self._index_written = data
        return True

    def _entry(self, name: str, seen: dict[str, Any], raw: bytes | BaseException | None) -> FolderEntry:
        step, quarantined = step_of_folder(name) or 0, QUARANTINE_NAME in seen["files"]
        listed = seen["files"].get(MANIFEST_NAME, -1)
        if listed == -1 or isinstance(raw, FileNotFoundError):  # not there (or deleted since the listing)
            return FolderEntry(name, step, None, f"no {MANIFEST_NAME}", True, quarantined, seen["modified"])
        if raw is None:
            problem = f"{MANIFEST_NAME} is {listed} bytes, more than the {MANIFEST_MAX} allowed; not read"
            return FolderEntry(name, step, None, problem, False, quarantined, None)
        if isinstance(raw, BaseException):
            problem = f"{MANIFEST_NAME} unreadable ({type(raw).__name__}: {str(raw)[:200]})"
            return FolderEntry(name, step, None, problem, False, quarantined, None)
        return FolderEntry(name, step, raw, None, False, quarantined, None)

    def manifest_exists(self, name: str) -> bool:
        """Whether the folder has a manifest. Only a real 'not found' is False: any other error
        propagates, so a folder is never taken for uncommitted because the store did not answer."""
        path = self.full(f"{name}/{MANIFEST_NAME}")
        self._forget(self.full(name))
        try:
            self.fs.info(path)
        except FileNotFoundError:
            return False
        return True

    def file_sizes(self, folder: str) -> dict[str, int | None]:
        self._forget(self.full(folder))
        prefix = self.full(folder).rstrip("/") + "/"
        try:
            found = self.fs.find(self.full(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(prefix):]: int(i.get("size") or 0) for p, i in found.items() if p.startswith(prefix)}

    def open_read(self, relpath: str) -> BinaryIO:
        return self.fs.open(self.full(relpath), "rb", block_size=64 << 20, cache_type="readahead")

    def stage(self, name: str) -> Staging:
        if self.manifest_exists(name):
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{name} is already a committed checkpoint")
        staging = _ObjectStaging(self, name, take_claim(self, name))
        # A winner drops its claim only once its manifest exists: checking again now that the claim
        # is ours closes the gap between the first check and the claim.
        if self.manifest_exists(name):
            staging.drop_claim()
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{name} is already a committed checkpoint")
        return staging

    def join(self, name: str, token: str) -> Staging:
        """Files for a checkpoint another process began (and holds the claim of): the final prefix."""
        if token != name:
            raise CheckpointExists(errno.EINVAL, f"{token[:80]!r} is not a staging of {name}")
        if self.manifest_exists(name):
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{name} is already a committed checkpoint")
        return _ObjectStaging(self, name, "")

    def put_create_only(self, relpath: str, data: bytes) -> None:
        """Write a small object only if it does not exist (S3 If-None-Match: *)."""
        path = self.full(relpath)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{relpath} already exists") from None
        except (ValueError, NotImplementedError, TypeError):
            pass  # this backend has no exclusive create: check, then write
        if self.fs.exists(path):
            raise CheckpointExists(errno.EEXIST, f"{self.location.url}/{relpath} already exists")
        self.fs.pipe_file(path, data)

    def remove_folder(self, name: str) -> None:
        try:
            self.fs.rm_file(self.full(f"{name}/{MANIFEST_NAME}"))
        except FileNotFoundError:
            pass
        try:
            self.fs.rm(self.full(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.root)

    def quarantine(self, name: str, data: bytes) -> None:
        """A marker takes the folder out of the listing at once; then a server-side copy moves it under
        .quarantine/ and the original goes (manifest first), so its step is free for a good copy, as on
        local disk. A copy that fails leaves the marked folder where it is: still out of the listing."""
        self.fs.pipe_file(self.full(f"{name}/{QUARANTINE_NAME}"), data)
        aside = f"{QUARANTINE_DIR}/{name}.{time.strftime('%Y%m%dT%H%M%S')}.{uuid.uuid4().hex[:6]}"
        try:
            self.fs.copy(self.full(name), self.full(aside), recursive=True)
        except Exception:  # noqa: BLE001 - best effort: the marker already did what matters
            return
        self.remove_folder(name)

    def list_staging(self) -> list[StagingEntry]:
        """Object stores stage under the final name: leftovers are folders without a manifest (scan)."""
        return []

    def remove_leftover(self, name: str) -> None:
        """Remove a folder without manifest, checked again now: it may have been committed since."""
        if self.manifest_exists(name):
            return
        try:
            self.fs.rm(self.full(name), recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(self.root)


def _size_ok(size: Any) -> bool:
    return not isinstance(size, (int, float)) or size <= MANIFEST_MAX


def _info_mtime(info: dict[str, Any]) -> float:
    value = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return time.time()
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    return float(value)
