"""The manifest: folder names, round trips, and every way a manifest can be unreadable."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from savegame.errors import CorruptCheckpoint, UnsupportedFormat
from savegame.storage import FileEntry, Manifest, folder_name, step_of_folder
from savegame.storage.checksum import Hasher, checksum_stream, is_supported
from savegame.storage.manifest import FORMAT_VERSION, parse_manifest

pytestmark = pytest.mark.unit

GOOD = {"format": 1, "step": 1200, "epoch": 3, "reason": "periodic", "created": "2026-11-26T04:09:10Z",
        "metrics": {"val_acc": 0.991}, "framework": "torch", "run_id": "r1", "resumed_from": 900,
        "files": [{"path": "model.safetensors", "bytes": 123, "checksum": "xxh3-128:" + "0" * 32}]}


def raw(**changes) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


@pytest.mark.parametrize("step, name", [(0, "ckpt-000000000000"), (1200, "ckpt-000000001200"),
                                        (10**12 - 1, "ckpt-999999999999")])
def test_folder_names(step, name):
    assert folder_name(step) == name
    assert step_of_folder(name) == step


@pytest.mark.parametrize("step", [-1, 10**12])
def test_steps_that_do_not_fit(step):
    with pytest.raises(ValueError):
        folder_name(step)


@pytest.mark.parametrize("name", ["ckpt-1200", "ckpt-000000001200.tmp", "ckpt-00000000120x", ".staging",
                                  "ckpt-0000000012000", "CKPT-000000001200", "ckpt-000000001200/"])
def test_other_folders_are_not_checkpoints(name):
    assert step_of_folder(name) is None


@settings(database=None, deadline=None, max_examples=100)
@given(step=st.integers(0, 10**12 - 1))
def test_folder_names_sort_like_steps(step):
    assert step_of_folder(folder_name(step)) == step
    assert (folder_name(step) < folder_name(step + 1)) if step + 1 < 10**12 else True


def test_the_design_document_example_parses():
    manifest = parse_manifest(raw(), "ckpt-000000001200")
    assert manifest.step == 1200 and manifest.epoch == 3 and manifest.resumed_from == 900
    assert manifest.metrics == {"val_acc": 0.991}
    assert manifest.files == (FileEntry("model.safetensors", 123, "xxh3-128:" + "0" * 32),)
    assert manifest.total_bytes == 123
    assert manifest.created_at.year == 2026 and manifest.created_at.utcoffset().total_seconds() == 0


metric_values = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(database=None, deadline=None, max_examples=200)
@given(step=st.integers(0, 10**12 - 1), epoch=st.integers(0, 10**6),
       reason=st.sampled_from(["periodic", "best", "emergency", "final", "manual"]),
       metrics=st.dictionaries(st.text(min_size=1, max_size=10), metric_values, max_size=4),
       files=st.lists(st.tuples(st.from_regex(r"[a-z][a-z0-9_]{0,5}(/[a-z0-9_]{1,5}){0,2}\.bin", fullmatch=True),
                                st.integers(0, 2**40)), max_size=4, unique_by=lambda f: f[0]),
       resumed=st.one_of(st.none(), st.integers(0, 10**9)), run_id=st.text(max_size=12))
def test_round_trip(step, epoch, reason, metrics, files, resumed, run_id):
    manifest = Manifest(step=step, epoch=epoch, reason=reason, created="2026-01-01T00:00:00.000001Z",
                        files=tuple(FileEntry(p, n, "xxh3-128:" + "ab" * 16) for p, n in files),
                        metrics=metrics, framework="torch", run_id=run_id, resumed_from=resumed)
    assert parse_manifest(manifest.to_json(), "x") == manifest


@pytest.mark.parametrize("data, problem", [
    (b"", "not valid JSON"),
    (b"{\"format\": 1, \"step\"", "not valid JSON"),
    (b"\xff\xfe garbage", "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (raw(format=...), "'format' is missing"),
    (raw(format="1"), "'format' must be an integer"),
    (raw(format=0), "'format' = 0 is out of range"),
    (raw(step=...), "'step' is missing"),
    (raw(step="twelve"), "'step' must be an integer"),
    (raw(step=10**12), "'step' = 1000000000000 is out of range"),
    (raw(step=True), "'step' must be an integer, not bool"),
    (raw(created=...), "'created' is missing"),
    (raw(created="yesterday"), "'created' = 'yesterday' is not an ISO 8601 time"),
    (raw(created=20261126), "'created' must be a string"),
    (raw(files=...), "'files' is missing"),
    (raw(files={"a.bin": 1}), "'files' must be an array"),
    (raw(files=[{"path": "a.bin"}]), "'bytes' is missing"),
    (raw(files=[{"path": "../escape.bin", "bytes": 1, "checksum": "xxh3-128:00"}]), "not a plain relative path"),
    (raw(files=[{"path": "/etc/passwd", "bytes": 1, "checksum": "xxh3-128:00"}]), "not a plain relative path"),
    (raw(files=[{"path": "a/../../b", "bytes": 1, "checksum": "xxh3-128:00"}]), "not a plain relative path"),
    (raw(files=[{"path": "a.bin", "bytes": -1, "checksum": "xxh3-128:00"}]), "'bytes' = -1 is out of range"),
    (raw(metrics={"acc": "high"}), "'acc' must be a number, not str"),
])
def test_bad_manifests_are_corrupt(data, problem):
    with pytest.raises(CorruptCheckpoint) as info:
        parse_manifest(data, "ckpt-000000001200")
    assert not isinstance(info.value, UnsupportedFormat)
    assert str(info.value).startswith("ckpt-000000001200: manifest.json")
    assert problem in str(info.value)


def test_a_newer_format_says_to_upgrade():
    with pytest.raises(UnsupportedFormat, match="format 2 is newer than this savegame reads .1.; upgrade"):
        parse_manifest(raw(format=FORMAT_VERSION + 1), "ckpt-000000001200")
    assert issubclass(UnsupportedFormat, CorruptCheckpoint)


def test_nan_metrics_are_dropped_and_optional_fields_default():
    manifest = parse_manifest(raw(metrics={"acc": math.nan, "loss": 0.5, "low": -math.inf, "high": math.inf},
                                  epoch=..., reason=..., framework=..., run_id=..., resumed_from=...), "x")
    assert manifest.metrics == {"loss": 0.5}
    assert (manifest.epoch, manifest.reason, manifest.framework, manifest.run_id, manifest.resumed_from) == \
        (0, "periodic", "", "", None)


def test_checksums():
    import io

    data = bytes(range(256)) * 40_000
    hasher = Hasher()
    hasher.update(data[:1000])
    hasher.update(memoryview(data)[1000:])
    assert checksum_stream(io.BytesIO(data)) == (len(data), hasher.digest())
    assert hasher.bytes == len(data) and is_supported(hasher.digest())
    altered = bytearray(data)
    altered[123_456] ^= 1
    assert checksum_stream(io.BytesIO(bytes(altered)))[1] != hasher.digest()
    assert not is_supported("crc32c:1234") and not is_supported("md5:abc")


def test_the_writer_leaves_non_finite_metrics_out_and_writes_strict_json():
    manifest = Manifest(step=1, epoch=0, reason="best", created="2026-01-01T00:00:00Z", files=(),
                        metrics={"loss": -math.inf, "acc": math.nan, "f1": 0.5})
    text = manifest.to_json().decode()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in a manifest"))["metrics"] == {"f1": 0.5}
