"""Bucket manifests cached by (path, ETag): a second listing reads no manifest it already has, and a
manifest that changed (new ETag), vanished, or a cache file that was tampered with is never taken
from the cache."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from savegame.storage import CheckpointStore

pytestmark = pytest.mark.integration


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("SAVEGAME_CACHE_DIR", str(folder))
    return folder


def save(store: CheckpointStore, step: int) -> None:
    with store.begin(step) as staged:
        staged.write_bytes("model.bin", bytes([step]) * 1000)
        staged.commit(epoch=step)


def manifest_gets(proxy) -> int:
    return sum(1 for method, path in proxy.seen if method == "GET" and path.endswith("/manifest.json"))


def test_a_second_listing_reads_no_manifest_it_has(s3_server, fault_proxy, cache_dir: Path):
    url = f"s3://{s3_server.make_bucket()}/run"
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": fault_proxy.endpoint},
               "skip_instance_cache": True}
    writer = CheckpointStore(url, s3_server.storage_options)
    for step in (1, 2, 3):
        save(writer, step)
    assert [c.step for c in CheckpointStore(url, options).list()] == [1, 2, 3]
    assert manifest_gets(fault_proxy) == 3
    assert oct((cache_dir / "manifests").stat().st_mode & 0o777) == "0o700"
    fault_proxy.seen.clear()
    save(writer, 4)
    assert [c.step for c in CheckpointStore(url, options).list()] == [1, 2, 3, 4]  # a new process: disk cache
    assert manifest_gets(fault_proxy) == 1  # only the new one


def test_a_changed_or_deleted_manifest_is_not_taken_from_the_cache(s3_server, cache_dir: Path):
    import s3fs

    url = f"s3://{s3_server.make_bucket()}/run"
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    store = CheckpointStore(url, {**s3_server.storage_options, "skip_instance_cache": True})
    for step in (1, 2, 3):
        save(store, step)
    assert [c.step for c in store.list()] == [1, 2, 3]
    path = f"{url}/ckpt-000000000002/manifest.json"
    data = json.loads(fs.cat_file(path))
    fs.pipe_file(path, json.dumps({**data, "epoch": "tampered"}).encode())  # same path, new ETag
    store.delete(3)
    fresh = CheckpointStore(url, {**s3_server.storage_options, "skip_instance_cache": True})
    scan = fresh.scan()
    assert [c.step for c in scan.committed] == [1]
    assert [(p.step, "'epoch' must be an integer" in p.problem) for p in scan.damaged] == [(2, True)]
    save(fresh, 3)  # a new commit of a deleted step: new object, read again
    assert fresh.get(3).epoch == 3


def test_a_tampered_cache_file_is_ignored(s3_server, cache_dir: Path):
    url = f"s3://{s3_server.make_bucket()}/run"
    store = CheckpointStore(url, {**s3_server.storage_options, "skip_instance_cache": True})
    save(store, 1)
    store.list()
    [cache_file] = (cache_dir / "manifests").iterdir()
    for garbage in (b"[" * 100_000, b"\xff", b'{"format": 1, "entries": {"x": [1, 2]}}', b"{" + b" " * (70 << 20)):
        cache_file.write_bytes(garbage)
        fresh = CheckpointStore(url, {**s3_server.storage_options, "skip_instance_cache": True})
        assert [c.step for c in fresh.list()] == [1]
    cache_file.unlink()
    cache_file.symlink_to("/dev/zero")
    assert [c.step for c in CheckpointStore(url, {**s3_server.storage_options, "skip_instance_cache": True}).list()] == [1]


def test_the_suite_never_writes_the_cache_into_the_home_folder(s3_server):
    """conftest points SAVEGAME_CACHE_DIR at a session temporary folder, and the `savegame` processes
    the tests start (helpers.savegame, Daemon) keep it: no test run fills ~/.cache/savegame."""
    import hashlib
    import os

    from helpers import savegame

    folder = os.environ.get("SAVEGAME_CACHE_DIR")
    assert folder and folder != "off", "tests/conftest.py must set SAVEGAME_CACHE_DIR"
    assert not Path(folder).resolve().is_relative_to(Path.home().resolve() / ".cache")
    bucket = s3_server.make_bucket()
    save(CheckpointStore(f"s3://{bucket}/run", s3_server.storage_options), 1)
    result = savegame("ls", f"s3://{bucket}/run", "--json", env=s3_server.env)
    assert result.returncode == 0, result.stderr
    name = hashlib.sha256(f"s3://{bucket}/run".encode()).hexdigest()[:32] + ".json"
    assert (Path(folder) / "manifests" / name).is_file(), "the CLI's cache went elsewhere"
    assert not (Path.home() / ".cache" / "savegame" / "manifests" / name).exists()
