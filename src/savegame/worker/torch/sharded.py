"""The torch adapter for the ranks of a torch.distributed job (DDP, FSDP2): sharded checkpoints.

Each rank copies into its reusable host buffer only what it writes -- its own shards of DTensors
(FSDP2) and, on rank 0 alone, the replicated tensors (DDP) -- so the training thread's stall is one
copy per rank. The background writer then runs torch.distributed.checkpoint (DCP) on a gloo group
of its own: DCP's planner lays the chunks out and records how each tensor is cut (what lets a job of
another size reshard on resume), savegame's storage layer (dcp_storage.py) writes them, and rank 0
commits one manifest for every rank's files. Models and optimizers go through DCP's state-dict
helpers (DDP's "module." prefix dropped, optimizer state keyed by parameter names); every
non-tensor leaf stays in savegame's JSON skeleton, so DCP never sees, and nothing ever pickles, one.

Layout of a checkpoint saved by W ranks:
    state.json                  rank 0's state, and the skeleton of every tracked object
    dcp.json                    DCP's metadata as JSON: each tensor's chunks and where they lie
    rank-<r>/tensors.safetensors   the chunks rank r wrote (r = 0 .. W-1)
    rank-<r>/state.json         rank r's own state: RNG states, data position, the script's counters
"""
from __future__ import annotations

import json
import logging
import warnings
from typing import Any, Callable, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.tensor import DTensor

from savegame.errors import CheckpointExists, StorageError
from savegame.storage import CheckpointInfo, CheckpointStore
from savegame.storage.manifest import folder_name, parse_manifest
from savegame.worker.adapter import STATE_FORMAT, Capture, CheckpointReader
from savegame.worker.codec import Encoder
from savegame.worker.safetensors_io import TensorBlob
from savegame.worker.torch.adapter import TorchAdapter, _torch_rng_states
from savegame.worker.torch.distributed import Agreement, Job
from savegame.worker.torch.dcp_storage import Commit, StagedWriter
from savegame.worker.torch.sharded_restore import agree_resume, restore_sharded
from savegame.worker.torch.state_dicts import object_state_dicts

log = logging.getLogger("savegame.worker")
LAYOUT = "sharded"


class ShardedTorchAdapter(TorchAdapter):
    """TorchAdapter's API (track, prepare_loader, ...) with sharded saves and resharding restores."""

    capture_in_place = None  # every save copies: the writer's collectives run in the background
    capture_into = None  # a rank's part is not one file a segment could hold: its own host buffer

    def __init__(self, job: Job) -> None:
        super().__init__()
        self.job = job

    def agreement(self, schedule: Any) -> Agreement:
        """The Checkpointer's stop and save decisions, agreed by every rank."""
        return Agreement(self.job, schedule)

    def leave_job(self) -> None:
        """After the final or emergency checkpoint, on every rank: the checkpoint groups go."""
        self.job.leave()

    def agree_resume(self, step: Optional[int]) -> None:
        """Every rank resumes from the same step (or all start fresh); refuse anything else."""
        agree_resume(self.job, step)

    def _encode(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        encoder = Encoder(lambda x: isinstance(x, torch.Tensor))
        skeleton = {name: encoder.encode(sd, name) for name, sd in object_state_dicts(self.objects).items()}
        return encoder.tensors, {"objects": skeleton}

    def capture(self) -> Capture:
        tensors, skeleton = self._encode()
        # What this rank writes: its shards of every DTensor; the replicated tensors on rank 0 only.
        mine = {n: t for n, t in tensors.items() if isinstance(t, DTensor) or self.job.coordinator}
        local = {n: (t.to_local() if isinstance(t, DTensor) else t) for n, t in mine.items()}
        blobs, fill, ready, _ = self._buffers.plan(local)
        rng = Encoder(lambda _: False).encode(_rng_bytes(), "torch_rng")

        def write(store: CheckpointStore, job: Any) -> CheckpointInfo:
            # DCP's planning (Python, collectives) waits for the copy rather than compete with it for
            # the interpreter and the cores: the training thread's stall stays one copy.
            ready(sum(b.data.nbytes for b in blobs))
            return save_sharded(store, job, self.job, mine, {b.name: b for b in blobs}, skeleton, rng, None)

        return Capture(fill=fill, write=write)

    def restore(self, reader: CheckpointReader) -> None:
        restore_sharded(self.job, self.objects, self._encode()[0], reader)


class HostCopyPlanner(DefaultSavePlanner):
    """DCP's default planner (chunk layout, dedup of replicated DTensors, metadata) over the live
    objects' shapes and placements, whose data comes from this rank's host copies."""

    def __init__(self, blobs: Mapping[str, TensorBlob]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, dedup_save_to_lowest_rank=True)
        self._blobs = blobs

    def resolve_data(self, write_item: Any) -> TensorBlob:  # type: ignore[override]
        return self._blobs[write_item.index.fqn]


def save_sharded(store: CheckpointStore, save: Any, job: Job, live: Mapping[str, torch.Tensor],
                 blobs: Mapping[str, TensorBlob], skeleton: Mapping[str, Any], rng: Any,
                 ready: Optional[Callable[[int], None]] = None) -> CheckpointInfo:
    """One collective save on the writer thread (`save` is the writer's SaveJob); every rank gets the
    committed checkpoint, or the same error."""
    core = dict(save.core_state)
    rank_state = json.dumps({**core, "rank": job.rank, "world_size": job.world_size, "torch_rng": rng}).encode()
    commit = None
    if job.coordinator:
        state = {**core, "format": STATE_FORMAT, "torch_rng": rng,
                 "adapter": {**skeleton, "layout": LAYOUT, "world_size": job.world_size}}
        commit = Commit(json.dumps(state).encode(), {
            "epoch": save.epoch, "reason": save.reason, "metrics": dict(save.metrics), "framework": save.framework,
            "run_id": save.run_id, "resumed_from": save.resumed_from})
    writer = StagedWriter(store, save.step, job.rank, job.world_size, blobs, rank_state, commit, ready)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "torch.distributed is disabled" for a job of one rank
            dcp.save(dict(live), storage_writer=writer, planner=HostCopyPlanner(blobs),
                     process_group=job.save_group, no_dist=job.world_size == 1)
    except CheckpointException as exc:
        raise _unwrapped(exc, save.step) from None
    finally:
        if writer.staged is not None and writer.committed is None:
            writer.staged.abort()
    return _shared_commit(store, job, writer.committed, save.step)


def _shared_commit(store: CheckpointStore, job: Job, committed: Optional[CheckpointInfo], step: int) -> CheckpointInfo:
    """Rank 0 committed (DCP's last collective said so to every rank); the others learn the manifest."""
    if job.save_group is None:
        assert committed is not None
        return committed
    shared = [committed.manifest.to_json() if committed is not None else None]
    dist.broadcast_object_list(shared, src=0, group=job.save_group)
    if not isinstance(shared[0], bytes):
        raise StorageError(f"step {step}: rank 0 reported no commit")
    name = folder_name(step)
    return CheckpointInfo(parse_manifest(shared[0], name), name, store.path_of(name))


def _unwrapped(exc: CheckpointException, step: int) -> BaseException:
    """DCP's CheckpointException (every rank's failures) as the one error that says what happened."""
    failures = {rank: pair[0] for rank, pair in exc.failures.items()}
    for rank, error in sorted(failures.items()):
        if isinstance(error, CheckpointExists):
            return CheckpointExists(error.errno or 17, str(error.strerror or error))
    rank, error = sorted(failures.items())[0]
    what = str(getattr(error, "strerror", None) or error).splitlines()[0][:500]
    return StorageError(f"step {step} not saved: rank {rank}: {type(error).__name__}: {what}")


def _rng_bytes() -> dict[str, Any]:
    """This rank's torch RNG states as bytes (they go into its own JSON file)."""
    states = _torch_rng_states()
    out: dict[str, Any] = {"cpu": bytes(states["cpu"].numpy())}
    if "cuda" in states:
        out["cuda"] = [bytes(s.numpy()) for s in states["cuda"]]
    return out
