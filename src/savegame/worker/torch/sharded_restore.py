"""Resuming a job from a sharded checkpoint, with the same number of ranks or another one.

Two phases, so that a checkpoint one rank cannot read never leaves the ranks in different states:
first every rank reads what it needs into fresh tensors (laid out like its live ones: DCP reshards
the saved chunks into them) and verifies every byte; then the ranks agree that all of them
succeeded, and only then is anything loaded into the live model and optimizer.

Same number of ranks: each rank gets back its own RNG states and data position (bit-identical).
Another number: models and optimizers reshard; where each rank stood inside an epoch cannot, so a
checkpoint from mid-epoch is refused unless SAVEGAME_RESHARD=restart-epoch says to train that
epoch again from its start.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from savegame.errors import ConfigError, CorruptCheckpoint
from savegame.protocol import EXIT_FAILED
from savegame.worker.adapter import STATE_FILE, CheckpointReader
from savegame.worker.codec import decode
from savegame.worker.exits import say
from savegame.worker.torch.buffers import DTYPES
from savegame.worker.torch.dcp_metadata import METADATA_FILE, metadata_from_json
from savegame.worker.torch.dcp_storage import VerifiedReader, rank_file, read_json
from savegame.worker.torch.distributed import Job
from savegame.worker.torch.state_dicts import load_object

log = logging.getLogger("savegame.worker")
RESHARD_ENV = "SAVEGAME_RESHARD"  # "restart-epoch": resume a mid-epoch checkpoint with another number of ranks


def agree_resume(job: Job, step: Optional[int]) -> None:
    """Every rank must resume from the same step (or all start fresh): a job never mixes steps."""
    if job.agree_group is None:
        return
    value = -1 if step is None else int(step)
    bounds = torch.tensor([value, -value], dtype=torch.int64)
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=job.agree_group)
    highest, lowest = int(bounds[0]), -int(bounds[1])
    if highest != lowest:
        say(f"the ranks of this job were told to resume from different checkpoints (steps {_step(lowest)} to "
            f"{_step(highest)}); every node's daemon must see the same run folder (or mirror): not starting")
        raise SystemExit(EXIT_FAILED)


def _step(value: int) -> str:
    return "none" if value < 0 else str(value)


def restore_sharded(job: Job, objects: Mapping[str, Any], live: Mapping[str, torch.Tensor],
                    reader: CheckpointReader) -> None:
    """Load `reader`'s checkpoint into the tracked objects and this rank's RNG; `reader.state`
    becomes this rank's own state (data position, counters) for the Checkpointer."""
    failure: Optional[BaseException] = None
    loaded: Any = None
    try:
        loaded = _read(job, objects, live, reader)
    except (CorruptCheckpoint, ConfigError, ValueError) as exc:
        failure = exc
    _all_succeeded(job, failure, reader)
    tensors, skeleton, state = loaded
    for name, obj in objects.items():
        load_object(name, obj, decode(skeleton[name], tensors.__getitem__), objects)
    _set_torch_rng(state.pop("torch_rng", None))
    reader.state = state


def _read(job: Job, objects: Mapping[str, Any], live: Mapping[str, torch.Tensor],
          reader: CheckpointReader) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    where = reader.info.path
    adapter = reader.state.get("adapter", {})
    if adapter.get("layout") != "sharded":
        raise ConfigError(f"{where} was saved by a single process; a job of {job.world_size} ranks resumes only from a "
                          "checkpoint saved under torch.distributed")
    skeleton = adapter.get("objects", {})
    missing = sorted(set(objects) - set(skeleton))
    if missing:
        raise ConfigError(f"{where} holds no state for {missing}; it was saved by another script")
    metadata, locations, saved_world = metadata_from_json(reader.read_bytes(METADATA_FILE), where)
    if saved_world != adapter.get("world_size") or saved_world != reader.info.manifest.world_size:
        raise CorruptCheckpoint(f"{where}: {METADATA_FILE}, {STATE_FILE} and the manifest disagree on the world size")
    templates = _templates({n: skeleton[n] for n in objects}, metadata, live, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no_dist loads on one process: each rank reads on its own
        dcp.load(templates, storage_reader=VerifiedReader(reader, metadata, locations),
                 planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)
    return templates, skeleton, _rank_state(job, reader, saved_world)


def _templates(skeleton: Mapping[str, Any], metadata: Any, live: Mapping[str, torch.Tensor],
               where: str) -> dict[str, torch.Tensor]:
    """Fresh tensors for every tensor the checkpoint holds, laid out (sharded) like the live ones."""
    names: set[str] = set()
    for encoded in skeleton.values():
        decode(encoded, lambda name: names.add(str(name)))
    templates = {}
    for name in sorted(names):
        saved = metadata.state_dict_metadata.get(name)
        if saved is None:
            raise CorruptCheckpoint(f"{where}: tensor {name} is not in {METADATA_FILE}")
        target = live.get(name)
        if target is None:  # e.g. optimizer state the live optimizer has not made yet
            templates[name] = torch.empty(saved.size, dtype=saved.properties.dtype)
            continue
        if tuple(target.shape) != tuple(saved.size) or target.dtype != saved.properties.dtype:
            raise ConfigError(f"{where}: tensor {name} is {DTYPES.get(saved.properties.dtype)}{list(saved.size)}, the "
                              f"live one {DTYPES.get(target.dtype)}{list(target.shape)}: the checkpoint does not fit "
                              "this model (it was saved by another model)")
        templates[name] = torch.empty_like(target)
    return templates


def _rank_state(job: Job, reader: CheckpointReader, saved_world: int) -> dict[str, Any]:
    """This rank's own state: its file when the job has the same size; else rank 0's position (after
    checking it can be carried over) and the RNG states of the rank of that number, if there was one."""
    state = dict(reader.state)
    if saved_world == job.world_size:
        own = read_json(reader, rank_file(job.rank, STATE_FILE))
        if own.get("rank") != job.rank or own.get("progress") != state.get("progress"):
            raise CorruptCheckpoint(f"{reader.info.path}: rank {job.rank}'s state is not of this checkpoint's step")
        return {**state, **own}
    progress = dict(state.get("progress", {}))
    batch, epoch = int(progress.get("batch_in_epoch", 0)), int(progress.get("epoch", 0))
    if batch and state.get("uses_epochs", True):  # a plain step loop keeps no data position here
        if os.environ.get(RESHARD_ENV) != "restart-epoch":
            raise ConfigError(
                f"{reader.info.path} was saved by {saved_world} ranks {batch} steps into epoch {epoch}; this job has "
                f"{job.world_size}, and where each rank stood in its share of the epoch cannot be carried over: resume "
                f"with {saved_world} ranks, or set {RESHARD_ENV}=restart-epoch to train epoch {epoch} again from its "
                f"start ({batch} steps of {saved_world} ranks are replayed)")
        if job.coordinator:
            log.warning("resharding %d -> %d ranks: epoch %d starts again (%d steps replayed)", saved_world,
                        job.world_size, epoch, batch)
        state["progress"] = {**progress, "batch_in_epoch": 0}
    if job.rank < saved_world:
        own = read_json(reader, rank_file(job.rank, STATE_FILE))
        state.update(rng=own.get("rng", {}), torch_rng=own.get("torch_rng"))
    else:  # no rank of this number saved: keep the RNG this process seeded (never another rank's)
        state.update(rng={}, torch_rng=None)
    return state


def _all_succeeded(job: Job, failure: Optional[BaseException], reader: CheckpointReader) -> None:
    """Every rank read and verified its part, or every rank raises (and nothing live was changed)."""
    flags = torch.tensor([isinstance(failure, ConfigError), failure is not None and
                          not isinstance(failure, ConfigError)], dtype=torch.int64)
    if job.agree_group is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=job.agree_group)
    if failure is not None:
        raise failure
    if flags[0]:
        raise ConfigError(f"{reader.info.path}: another rank found that it does not fit this job (see its error)")
    if flags[1]:
        raise CorruptCheckpoint(f"{reader.info.path}: another rank could not read its part (see its error)")


def _set_torch_rng(states: Any) -> None:
    if not isinstance(states, dict):
        return
    decoded = decode(states, lambda name: None)
    cpu = decoded.get("cpu")
    if isinstance(cpu, bytes):
        torch.set_rng_state(torch.frombuffer(bytearray(cpu), dtype=torch.uint8))
    cuda = decoded.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all([torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in cuda])
