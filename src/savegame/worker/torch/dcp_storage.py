"""DCP's storage layer, on savegame's store: one staged checkpoint that every rank writes into.

Call order (torch.distributed.checkpoint.save, on the writer thread's gloo group):
    every rank:   prepare_local_plan
    rank 0:       prepare_global_plan: begins the checkpoint; every plan carries its staging token
    every rank:   write_data: joins the staging, writes rank-<r>/tensors.safetensors (this rank's
                  chunks, straight from the host copies) and rank-<r>/state.json; reports its files
    rank 0:       finish: only once every rank's report arrived (DCP gathers them) and they all
                  agree on the step: dcp.json, state.json, then the manifest (last) listing every file
A rank that dies or fails leaves no manifest: DCP raises on every rank, and the staging is collected.

Reading verifies every byte it uses against the manifest's checksums (whole files are hashed as
they stream); nothing is unpickled.
"""
from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Optional

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from savegame.errors import CorruptCheckpoint
from savegame.storage import CheckpointInfo, CheckpointStore, StagedCheckpoint
from savegame.storage.manifest import FileEntry
from savegame.worker.adapter import STATE_FILE, CheckpointReader
from savegame.worker.safetensors_io import TensorBlob, TensorInfo, read_safetensors, write_safetensors
from savegame.worker.torch.buffers import TORCH_DTYPES, bytes_view
from savegame.worker.torch.dcp_metadata import METADATA_FILE, ChunkLocation, entry_name, metadata_to_json
from savegame.storage.direct import DIRECT_ALIGN, DirectWrites

REPORT = "__savegame_rank_files__"  # the fqn of each rank's report among the write results


def rank_file(rank: int, name: str) -> str:
    return f"rank-{rank}/{name}"


@dataclass(frozen=True)
class RankReport:
    """What one rank wrote into the checkpoint, sent to rank 0 with its write results."""

    rank: int
    step: int
    files: tuple[FileEntry, ...]


@dataclass(frozen=True)
class Commit:
    """What rank 0 needs to commit: the global state file and the manifest's fields."""

    state: bytes
    fields: Mapping[str, Any]  # epoch, reason, metrics, framework, run_id, resumed_from


class StagedWriter(StorageWriter):
    """One rank's writer. `blobs`: this rank's host copies by fqn; `rank_state`: rank-<r>/state.json."""

    def __init__(self, store: CheckpointStore, step: int, rank: int, world_size: int,
                 blobs: Mapping[str, TensorBlob], rank_state: bytes, commit: Optional[Commit],
                 ready: Optional[Callable[[int], None]] = None) -> None:
        super().__init__()
        self.store, self.step, self.rank, self.world_size = store, step, rank, world_size
        self.blobs, self.rank_state, self.commit, self.ready = blobs, rank_state, commit, ready
        self.staged: Optional[StagedCheckpoint] = None  # rank 0's, from prepare_global_plan
        self.committed: Optional[CheckpointInfo] = None

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Rank 0 begins the checkpoint; every rank learns where to write (the staging's token)."""
        if len(plans) != self.world_size:
            raise RuntimeError(f"{len(plans)} ranks planned this save, the job has {self.world_size}")
        self.staged = self.store.begin(self.step)
        return [replace(plan, storage_data=self.staged.token) for plan in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        staged = self.staged if self.staged is not None else self.store.join(self.step, str(plan.storage_data))
        relpath = rank_file(self.rank, "tensors.safetensors")
        blobs, results = [], []
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
                raise ValueError(f"{item.index.fqn}: only tensors are written into a sharded checkpoint")
            blob: TensorBlob = planner.resolve_data(item)
            name = entry_name(item.index.fqn, item.tensor_data.chunk.offsets)
            if tuple(blob.shape) != tuple(item.tensor_data.chunk.sizes):
                raise RuntimeError(f"{item.index.fqn}: the copy is {list(blob.shape)}, the chunk "
                                   f"{list(item.tensor_data.chunk.sizes)}")
            blobs.append(TensorBlob(name, blob.dtype, blob.shape, blob.data))
            results.append(WriteResult(item.index, blob.data.nbytes, ChunkLocation(relpath, name)))
        if self.ready is not None:
            self.ready(sum(b.data.nbytes for b in self.blobs.values()))  # the host copy is complete
        with staged.open(relpath) as f, DirectWrites(f) as direct:
            write_safetensors(direct, blobs, {"format": "savegame-shard", "step": str(self.step),
                                              "rank": str(self.rank)}, align=DIRECT_ALIGN)
        staged.write_bytes(rank_file(self.rank, STATE_FILE), self.rank_state)
        mine = tuple(e for e in staged.files if e.path.startswith(f"rank-{self.rank}/"))
        results.append(WriteResult(MetadataIndex(f"{REPORT}{self.rank}"), 0, RankReport(self.rank, self.step, mine)))
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Rank 0, once every rank reported: metadata, global state, then the manifest, last."""
        assert self.staged is not None and self.commit is not None
        reports, locations = _split_results(results)
        if sorted(reports) != list(range(self.world_size)):
            raise RuntimeError(f"ranks {sorted(set(range(self.world_size)) - set(reports))} did not report their files")
        for rank, report in sorted(reports.items()):
            if report.step != self.step:
                raise RuntimeError(f"rank {rank} saved step {report.step}, rank 0 step {self.step}: not mixing them")
            if rank != self.rank:
                self.staged.adopt(report.files)
        self.staged.write_bytes(METADATA_FILE, metadata_to_json(metadata, locations, self.world_size))
        self.staged.write_bytes(STATE_FILE, self.commit.state)
        self.committed = self.staged.commit(world_size=self.world_size, **self.commit.fields)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def storage_meta(self) -> None:
        return None


def _split_results(results: list[list[WriteResult]]) -> tuple[dict[int, RankReport], dict[MetadataIndex, ChunkLocation]]:
    reports: dict[int, RankReport] = {}
    locations: dict[MetadataIndex, ChunkLocation] = {}
    for rank_results in results:
        for result in rank_results:
            if isinstance(result.storage_data, RankReport):
                reports[result.storage_data.rank] = result.storage_data
            else:
                locations[result.index] = result.storage_data
    return reports, locations


class VerifiedReader(StorageReader):
    """Reads chunks from the checkpoint's rank files into DCP's targets; every file it reads from is
    hashed whole and checked against the manifest before any of its bytes reach a target."""

    def __init__(self, reader: CheckpointReader, metadata: Metadata, locations: Mapping[MetadataIndex, ChunkLocation]) -> None:
        super().__init__()
        self.reader, self.metadata, self.locations = reader, metadata, locations
        self._entries = {f.path: f for f in reader.info.manifest.files}

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
        for request in plan.items:
            where = self.locations.get(request.storage_index)
            if where is None:
                raise CorruptCheckpoint(f"{self.reader.info.path}: no chunk of {request.storage_index.fqn} at "
                                        f"{list(request.storage_index.offset or [])}")
            by_file[where.file][where.entry].append(request)
        for relpath, wanted in sorted(by_file.items()):
            loaded = self._read_file(relpath, wanted)
            for entry, requests in wanted.items():
                for request in requests:
                    source = narrow_tensor_by_index(loaded[entry], request.storage_offsets, request.lengths)
                    target = planner.resolve_tensor(request).detach()
                    if target.shape != source.shape:
                        raise CorruptCheckpoint(f"{self.reader.info.path}: {entry} does not fit {request.dest_index.fqn}")
                    target.copy_(source)
                    planner.commit_tensor(request, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(self, relpath: str, wanted: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The entries of one rank file that are wanted, after the whole file's checksum matched."""
        entry = self._entries.get(relpath)
        if entry is None:
            raise CorruptCheckpoint(f"{self.reader.info.path}: {relpath} is not in the manifest")
        loaded: dict[str, torch.Tensor] = {}
        scratch = bytearray()

        def allocate(info: TensorInfo) -> memoryview:
            nonlocal scratch
            if info.name in wanted:
                loaded[info.name] = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
                return memoryview(bytes_view(loaded[info.name]).numpy())
            if len(scratch) < info.nbytes:  # another rank's share: read (it is hashed) but not kept
                scratch = bytearray(info.nbytes)
            return memoryview(scratch)[:info.nbytes]

        where = f"{self.reader.info.path}/{relpath}"
        with self.reader.store.open_file(self.reader.info, relpath) as stream:
            read_safetensors(stream, allocate, where, expected=(entry.bytes, entry.checksum))
        missing = sorted(set(wanted) - set(loaded))
        if missing:
            raise CorruptCheckpoint(f"{where}: the chunks {missing[:3]} are missing")
        return loaded

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def read_json(reader: CheckpointReader, relpath: str) -> dict[str, Any]:
    """A small JSON payload file, checksum verified."""
    try:
        data = json.loads(reader.read_bytes(relpath))
    except ValueError:
        raise CorruptCheckpoint(f"{reader.info.path}: {relpath} is not valid JSON") from None
    if not isinstance(data, dict):
        raise CorruptCheckpoint(f"{reader.info.path}: {relpath} is not a JSON object")
    return data
