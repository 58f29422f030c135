"""DCP's metadata as savegame writes it (JSON, never pickle) and what the reader refuses."""
from __future__ import annotations

import json

import pytest
import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)

from savegame.errors import CorruptCheckpoint, UnsupportedFormat
from savegame.worker.torch.dcp_metadata import ChunkLocation, entry_name, metadata_from_json, metadata_to_json

pytestmark = pytest.mark.frameworks


def _metadata() -> tuple[Metadata, dict]:
    chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([5, 6])),
              ChunkStorageMetadata(torch.Size([5, 0]), torch.Size([4, 6]))]
    md = {"w": TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size([9, 6]), chunks),
          "step": TensorStorageMetadata(TensorProperties(dtype=torch.int64), torch.Size([]),
                                        [ChunkStorageMetadata(torch.Size([]), torch.Size([]))])}
    where = {MetadataIndex("w", [0, 0]): ChunkLocation("rank-0/tensors.safetensors", entry_name("w", [0, 0])),
             MetadataIndex("w", [5, 0]): ChunkLocation("rank-1/tensors.safetensors", entry_name("w", [5, 0])),
             MetadataIndex("step", []): ChunkLocation("rank-0/tensors.safetensors", entry_name("step", []))}
    return Metadata(md), where


def _json() -> dict:
    metadata, where = _metadata()
    return json.loads(metadata_to_json(metadata, where, world_size=2))


def test_round_trip() -> None:
    metadata, where = _metadata()
    parsed, locations, world = metadata_from_json(metadata_to_json(metadata, where, 2), "ckpt")
    assert world == 2 and locations == where
    assert parsed.state_dict_metadata["w"].chunks == metadata.state_dict_metadata["w"].chunks
    assert parsed.state_dict_metadata["step"].properties.dtype == torch.int64


def _chunk(data: dict, i: int = 1) -> dict:
    return data["tensors"]["w"]["chunks"][i]


@pytest.mark.parametrize("forge, problem", [
    (lambda d: _chunk(d).update(offsets=[4, 0], entry="w@4,0"), "overlap"),
    (lambda d: _chunk(d).update(sizes=[3, 6]), "hold 48 elements, the tensor has 54"),
    (lambda d: _chunk(d).update(offsets=[7, 0], entry="w@7,0"), "reaches past the tensor's size"),
    (lambda d: _chunk(d).update(file="../../etc/passwd"), "file"),
    (lambda d: _chunk(d).update(entry="w@0,0"), "names the entry"),
    (lambda d: d["tensors"]["w"]["chunks"].append(dict(_chunk(d, 0))), "listed twice"),
    (lambda d: d["tensors"]["w"].update(dtype="PICKLE"), "unknown dtype"),
    (lambda d: d["tensors"]["w"].update(extra=1), "exactly dtype, size and chunks"),
    (lambda d: _chunk(d).update(offsets=[-1, 0]), "offsets"),
    (lambda d: _chunk(d).update(sizes=[4]), "for a 2-d tensor"),
    (lambda d: d.pop("tensors"), "no 'tensors' object"),
])
def test_forged_metadata_is_damage_naming_the_problem(forge, problem: str) -> None:
    data = _json()
    forge(data)
    with pytest.raises(CorruptCheckpoint, match=problem):
        metadata_from_json(json.dumps(data).encode(), "ckpt")


def test_not_json_and_newer_formats() -> None:
    import pickle

    with pytest.raises(CorruptCheckpoint, match="not UTF-8|not valid JSON"):
        metadata_from_json(pickle.dumps({"a": 1}), "ckpt")
    data = _json()
    data["format"] = 2
    with pytest.raises(UnsupportedFormat, match="newer than this savegame reads"):
        metadata_from_json(json.dumps(data).encode(), "ckpt")
