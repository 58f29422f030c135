"""DCP's Metadata as strict JSON: what every tensor is, how it is cut into chunks, and where each
chunk lies (a rank's safetensors file and the entry in it).

DCP's own FileSystemReader unpickles its `.metadata` file, which runs code from storage. This
replaces it: only tensors are described (savegame never hands DCP anything else), every field is
checked before use, and a file that does not describe a consistent set of chunks is refused as
damaged (CorruptCheckpoint), naming what is wrong.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)

from savegame.errors import CorruptCheckpoint, MalformedInput, UnsupportedFormat
from savegame.storage.manifest import check_payload_path
from savegame.untrusted import integer, load_json, text
from savegame.worker.torch.buffers import DTYPES, TORCH_DTYPES

METADATA_FILE = "dcp.json"
FORMAT = 1
MAX_BYTES = 256 << 20
MAX_DIMS = 64
_DIM = integer(0, 1 << 53)
_NAME = text(4096)


@dataclass(frozen=True)
class ChunkLocation:
    """Where one saved chunk's bytes are: a payload file of the checkpoint and its safetensors entry."""

    file: str
    entry: str


def entry_name(fqn: str, offsets: Any) -> str:
    """The safetensors entry of one chunk: the tensor's name and where the chunk starts in it."""
    return f"{fqn}@{','.join(str(int(o)) for o in offsets)}"


def metadata_to_json(metadata: Metadata, locations: Mapping[MetadataIndex, ChunkLocation], world_size: int) -> bytes:
    tensors: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"{fqn}: only tensors go into a sharded checkpoint (this is {type(md).__name__})")
        chunks = []
        for chunk in md.chunks:
            where = locations[MetadataIndex(fqn, chunk.offsets)]
            chunks.append({"offsets": list(chunk.offsets), "sizes": list(chunk.sizes), "file": where.file,
                           "entry": where.entry})
        tensors[fqn] = {"dtype": DTYPES[md.properties.dtype], "size": list(md.size), "chunks": chunks}
    data = {"format": FORMAT, "dcp_version": str(metadata.version or ""), "world_size": world_size, "tensors": tensors}
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def metadata_from_json(raw: bytes, where: str) -> tuple[Metadata, dict[MetadataIndex, ChunkLocation], int]:
    """(DCP Metadata, each chunk's location, the world size that saved it); CorruptCheckpoint if bad."""
    what = f"{where}/{METADATA_FILE}"
    try:
        data = load_json(raw, what=what, max_bytes=MAX_BYTES, max_depth=6)
        if not isinstance(data, dict) or not isinstance(data.get("tensors"), dict):
            raise MalformedInput(f"{what}: not a sharded checkpoint's metadata (no 'tensors' object)")
        version = integer(1, 1 << 31)(data.get("format"))
        if version > FORMAT:
            raise UnsupportedFormat(f"{what}: format {version} is newer than this savegame reads ({FORMAT})")
        world = integer(1, 1 << 20)(data.get("world_size"))
        state, locations = {}, {}
        for fqn, entry in data["tensors"].items():
            state[fqn] = _tensor(_NAME(fqn), entry, locations)
    except (MalformedInput, ValueError, TypeError) as exc:
        raise CorruptCheckpoint(f"{what}: {exc}".replace(f"{what}: {what}", what)) from None
    metadata = Metadata(state_dict_metadata=state, storage_data=locations, version=str(data.get("dcp_version", "")))
    return metadata, locations, world


def _tensor(fqn: str, entry: Any, locations: dict[MetadataIndex, ChunkLocation]) -> TensorStorageMetadata:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "size", "chunks"}:
        raise ValueError(f"tensor {fqn!r}: must hold exactly dtype, size and chunks")
    if entry["dtype"] not in TORCH_DTYPES:
        raise ValueError(f"tensor {fqn!r}: unknown dtype {str(entry['dtype'])[:20]!r}")
    size = _dims(entry["size"], f"tensor {fqn!r}: size")
    if not isinstance(entry["chunks"], list) or not entry["chunks"]:
        raise ValueError(f"tensor {fqn!r}: chunks must be a non-empty list")
    chunks = [_chunk(fqn, size, c, locations) for c in entry["chunks"]]
    _check_coverage(fqn, size, chunks)
    return TensorStorageMetadata(TensorProperties(dtype=TORCH_DTYPES[entry["dtype"]]), torch.Size(size), chunks)


def _chunk(fqn: str, size: list[int], chunk: Any, locations: dict[MetadataIndex, ChunkLocation]) -> ChunkStorageMetadata:
    what = f"tensor {fqn!r}: chunk"
    if not isinstance(chunk, dict) or set(chunk) != {"offsets", "sizes", "file", "entry"}:
        raise ValueError(f"{what} must hold exactly offsets, sizes, file and entry")
    offsets, sizes = _dims(chunk["offsets"], f"{what} offsets"), _dims(chunk["sizes"], f"{what} sizes")
    if len(offsets) != len(size) or len(sizes) != len(size):
        raise ValueError(f"{what} has {len(offsets)} offsets and {len(sizes)} sizes for a {len(size)}-d tensor")
    if any(o + s > n for o, s, n in zip(offsets, sizes, size)):
        raise ValueError(f"{what} at {offsets} of {sizes} reaches past the tensor's size {size}")
    try:
        file = check_payload_path(chunk["file"])
    except ValueError as exc:
        raise ValueError(f"{what} file {exc}") from None
    if chunk["entry"] != entry_name(fqn, offsets):
        raise ValueError(f"{what} at {offsets} names the entry {str(chunk['entry'])[:80]!r}")
    index = MetadataIndex(fqn, offsets)
    if index in locations:
        raise ValueError(f"{what} at {offsets} is listed twice")
    locations[index] = ChunkLocation(file, chunk["entry"])
    return ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes))


def _dims(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise ValueError(f"{what} must be a list of at most {MAX_DIMS} integers")
    try:
        return [_DIM(v) for v in value]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} {str(exc).lstrip('= ')}") from None


MAX_CHUNKS = 1 << 16


def _check_coverage(fqn: str, size: list[int], chunks: list[ChunkStorageMetadata]) -> None:
    """The chunks hold every element of the tensor exactly once: none overlaps another, and together
    they hold as many elements as the tensor has."""
    if len(chunks) > MAX_CHUNKS:
        raise ValueError(f"tensor {fqn!r}: {len(chunks)} chunks, more than {MAX_CHUNKS}")
    boxes = sorted((tuple(c.offsets), tuple(c.sizes)) for c in chunks if _count(c.sizes))
    for i, (a_off, a_size) in enumerate(boxes):
        for b_off, b_size in boxes[i + 1:]:
            if b_off[0] >= a_off[0] + a_size[0] if size else False:
                break  # sorted by the first offset: nothing further can overlap this one
            if all(b < a + m and a < b + n for a, m, b, n in zip(a_off, a_size, b_off, b_size)):
                raise ValueError(f"tensor {fqn!r}: chunks at {list(a_off)} and {list(b_off)} overlap")
    held, total = sum(_count(c.sizes) for c in chunks), _count(size)
    if held != total:
        raise ValueError(f"tensor {fqn!r}: its chunks hold {held} elements, the tensor has {total}")


def _count(dims: Any) -> int:
    total = 1
    for n in dims:
        total *= int(n)
    return total
