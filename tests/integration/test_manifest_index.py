"""A bucket's manifest index (`.savegame/manifests.json`): one object with every committed manifest's
bytes and ETag, rewritten by the mirror after each change, so a cold listing of a bucket reads one
object instead of one per checkpoint. It is checked against the real listing: a manifest the index
lacks, holds under another ETag, or holds with bytes that do not match an MD5 ETag is read from the
bucket itself, and an index that does not parse is ignored."""
from __future__ import annotations

import json

import pytest

from helpers import Daemon, counter
from savegame.storage import CheckpointStore
from savegame.storage.manifestindex import INDEX_PATH, MIN_INDEXED_READS

pytestmark = pytest.mark.integration
COUNT = MIN_INDEXED_READS + 4


@pytest.fixture
def cold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAVEGAME_CACHE_DIR", "off")  # no manifest cache on disk: every listing is cold


def save(store: CheckpointStore, step: int) -> None:
    with store.begin(step) as staged:
        staged.write_bytes("model.bin", bytes([step % 256]) * 100)
        staged.commit(epoch=step, metrics={"loss": 1.0 / step})


def reader(url: str, proxy) -> CheckpointStore:
    return CheckpointStore(url, {"key": "testing", "secret": "testing", "skip_instance_cache": True,
                                 "client_kwargs": {"endpoint_url": proxy.endpoint}})


def gets(proxy, suffix: str) -> int:
    return sum(1 for method, path in proxy.seen if method == "GET" and path.split("?")[0].endswith(suffix))


def summary(infos) -> list[tuple[int, dict]]:
    return [(info.step, dict(info.metrics)) for info in infos]


@pytest.fixture
def bucket(s3_server):
    url = f"s3://{s3_server.make_bucket()}/run"
    writer = CheckpointStore(url, s3_server.storage_options)
    for step in range(1, COUNT + 1):
        save(writer, step)
    return url, writer


def test_a_cold_listing_reads_the_index_instead_of_every_manifest(bucket, fault_proxy, cold):
    url, writer = bucket
    truth = summary(writer.list())
    assert writer.write_index() is True
    assert writer.write_index() is False  # unchanged: not written again
    fault_proxy.seen.clear()
    assert summary(reader(url, fault_proxy).list()) == truth
    assert gets(fault_proxy, "/manifest.json") == 0 and gets(fault_proxy, INDEX_PATH) == 1


def test_a_stale_index_is_completed_from_the_manifests(bucket, fault_proxy, cold):
    url, writer = bucket
    writer.write_index()
    save(writer, COUNT + 1)
    save(writer, COUNT + 2)
    writer.delete(1)
    fault_proxy.seen.clear()
    listed = summary(reader(url, fault_proxy).list())
    assert listed == summary(writer.list()) and listed[0][0] == 2 and listed[-1][0] == COUNT + 2
    assert gets(fault_proxy, "/manifest.json") == 2  # only the two the index does not hold


def test_an_index_that_lies_is_not_believed(bucket, fault_proxy, cold, s3_server):
    import s3fs

    url, writer = bucket
    truth = summary(writer.list())
    writer.write_index()
    fs = s3fs.S3FileSystem(**s3_server.storage_options, skip_instance_cache=True)
    path = url[len("s3://"):] + "/" + INDEX_PATH
    index = json.loads(fs.cat_file(path))
    names = sorted(index["entries"])
    etag, text = index["entries"][names[0]]
    index["entries"][names[0]] = [etag, text.replace('"loss"', '"lossy"')]  # same ETag, other bytes
    index["entries"][names[1]][0] = '"0123456789abcdef0123456789abcdef"'  # another ETag
    fs.pipe_file(path, json.dumps(index).encode())
    fault_proxy.seen.clear()
    assert summary(reader(url, fault_proxy).list()) == truth
    assert gets(fault_proxy, "/manifest.json") == 2
    fs.pipe_file(path, b"{not json")
    fault_proxy.seen.clear()
    assert summary(reader(url, fault_proxy).list()) == truth
    assert gets(fault_proxy, "/manifest.json") == COUNT


def test_the_mirror_keeps_the_index_current(tmp_path, s3_server, fault_proxy, cold):
    url = f"s3://{s3_server.make_bucket()}/run"
    config = tmp_path / "keep.toml"
    config.write_text(f"[mirror_keep]\nlast = {COUNT + 10}\n")
    daemon = Daemon(tmp_path / "run", counter("--steps", 5 * COUNT, "--every", 5),
                    ["--mirror", url, "--config", str(config)], env=s3_server.env).start()
    assert daemon.wait(timeout=120) == 0, daemon.stderr
    truth = summary(CheckpointStore(url, s3_server.storage_options).list())
    assert len(truth) >= MIN_INDEXED_READS
    fault_proxy.seen.clear()
    assert summary(reader(url, fault_proxy).list()) == truth
    assert gets(fault_proxy, "/manifest.json") == 0, "the mirror left the index behind the bucket"
