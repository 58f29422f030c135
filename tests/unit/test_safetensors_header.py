"""The safetensors header parser trusts nothing: strict types, bounded JSON, offsets that tile the file."""
from __future__ import annotations

import json

import pytest

from savegame.errors import CorruptCheckpoint, UnsupportedFormat
from savegame.worker.safetensors_io import TensorInfo, parse_header

pytestmark = pytest.mark.unit


def header(**entries: object) -> bytes:
    return json.dumps(entries).encode()


GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "U8", "shape": [3], "data_offsets": [16, 19]}}


def test_a_good_header() -> None:
    infos, metadata = parse_header(header(__metadata__={"step": "3"}, **GOOD), "f", data_bytes=19)
    assert infos == [TensorInfo("a", "F32", (2, 2), 0, 16), TensorInfo("b", "U8", (3,), 16, 19)]
    assert metadata == {"step": "3"}


@pytest.mark.parametrize("entry, words", [
    ({"dtype": "F32", "shape": [2.0, 2], "data_offsets": [0, 16]}, "shape must be an integer, not float"),
    ({"dtype": "F32", "shape": [True, 4], "data_offsets": [0, 16]}, "shape must be an integer, not bool"),
    ({"dtype": "F32", "shape": "2,2", "data_offsets": [0, 16]}, "shape must be a list"),
    ({"dtype": "F32", "shape": [1] * 65, "data_offsets": [0, 4]}, "shape must be a list of at most 64"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16, 32]}, "data_offsets must be [start, end]"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0.0, 16]}, "data_offsets must be an integer"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}, "do not hold F32[2, 2]"),
    ({"dtype": "F32", "shape": [2, 2]}, "exactly dtype, shape and data_offsets"),
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], "extra": 1}, "exactly dtype, shape and data_offsets"),
    ([1, 2], "exactly dtype, shape and data_offsets"),
])
def test_malformed_entries_name_the_tensor(entry: object, words: str) -> None:
    with pytest.raises(CorruptCheckpoint, match="tensor 'a'") as info:
        parse_header(header(a=entry), "f")
    assert words in str(info.value)


@pytest.mark.parametrize("dtype", ["F128", 5, None])
def test_unknown_dtypes_are_unsupported(dtype: object) -> None:
    with pytest.raises(UnsupportedFormat, match="unsupported dtype"):
        parse_header(header(a={"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}), "f")


@pytest.mark.parametrize("raw, words", [
    (b"[1, 2]", "not an object"),
    (b"{\"a\": ", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (header(__metadata__=["x"], **GOOD), "__metadata__ must be an object of strings"),
    (header(__metadata__={"step": 3}, **GOOD), "__metadata__ must be an object of strings"),
    (json.dumps({**GOOD, "junk": [[[[[]]]]]}).encode(), "nested more than 3 levels deep"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', "not valid JSON"),
])
def test_malformed_headers(raw: bytes, words: str) -> None:
    with pytest.raises(CorruptCheckpoint, match="f") as info:
        parse_header(raw, "f")
    assert words in str(info.value)


@pytest.mark.parametrize("b_offsets, words", [
    ([8, 11], "overlap those of 'a'"),
    ([0, 3], "overlap those of"),
    ([20, 23], "leave a gap after 'a'"),
])
def test_offsets_must_tile_the_data(b_offsets: list[int], words: str) -> None:
    entries = {**GOOD, "b": {"dtype": "U8", "shape": [3], "data_offsets": b_offsets}}
    with pytest.raises(CorruptCheckpoint) as info:
        parse_header(header(**entries), "f")
    assert words in str(info.value)


@pytest.mark.parametrize("data_bytes, words", [(18, "beyond the end of the file"), (40, "short of the end")])
def test_the_data_must_end_where_the_file_ends(data_bytes: int, words: str) -> None:
    with pytest.raises(CorruptCheckpoint, match="tensor 'b'") as info:
        parse_header(header(**GOOD), "f", data_bytes=data_bytes)
    assert words in str(info.value)
