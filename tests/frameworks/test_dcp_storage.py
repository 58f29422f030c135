"""savegame's DCP storage layer, driven the way DCP drives it (no processes): rank 0 commits only once
every rank reported its files for the same step; anything less leaves no checkpoint."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy
import pytest
import torch

from savegame.errors import StorageError
from savegame.storage import CheckpointStore
from savegame.worker.safetensors_io import TensorBlob
from savegame.worker.torch.dcp_storage import Commit, RankReport, StagedWriter
from savegame.worker.torch.sharded import HostCopyPlanner

pytestmark = pytest.mark.frameworks
FIELDS = {"epoch": 0, "reason": "periodic", "metrics": {}, "framework": "torch", "run_id": "t", "resumed_from": None}


def _blob(name: str, t: torch.Tensor) -> TensorBlob:
    data = numpy.ascontiguousarray(t.numpy())
    return TensorBlob(name, "F32", tuple(t.shape), memoryview(data).cast("B"))


def _ranks(store: CheckpointStore, steps: tuple[int, int] = (5, 5)):
    """Two ranks' writers and planners over one replicated tensor (rank 0's) and one each of their own."""
    tensors = [{"w": torch.ones(3), "a": torch.zeros(2)}, {"b": torch.full((4,), 2.0)}]
    writers, planners = [], []
    for rank in (0, 1):
        blobs = {n: _blob(n, t) for n, t in tensors[rank].items()}
        commit = Commit(b'{"format": 1}', FIELDS) if rank == 0 else None
        writers.append(StagedWriter(store, steps[rank], rank, 2, blobs, b'{"rank": %d}' % rank, commit))
        planner = HostCopyPlanner(blobs)
        planner.set_up_planner(tensors[rank], is_coordinator=rank == 0)
        planners.append(planner)
    plans, metadata = planners[0].create_global_plan([p.create_local_plan() for p in planners])
    plans = writers[0].prepare_global_plan(plans)
    results = [writers[r].write_data(planners[r].finish_plan(plans[r]), planners[r]).value() for r in (0, 1)]
    return writers, metadata, results


def test_every_rank_reported_then_one_manifest_lists_all(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "run"))
    writers, metadata, results = _ranks(store)
    writers[0].finish(metadata, results)
    info = store.get(5)
    assert info.manifest.world_size == 2
    assert {f.path for f in info.manifest.files} == {"state.json", "dcp.json", "rank-0/state.json",
                                                   "rank-0/tensors.safetensors", "rank-1/state.json",
                                                   "rank-1/tensors.safetensors"}
    assert store.verify(info) == []


def test_a_missing_report_means_no_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(str(tmp_path / "run"))
    writers, metadata, results = _ranks(store)
    with pytest.raises(RuntimeError, match=r"ranks \[1\] did not report"):
        writers[0].finish(metadata, results[:1])
    writers[0].staged.abort()
    assert store.list() == [] and not list((tmp_path / "run" / ".staging").iterdir())


def test_ranks_of_different_steps_are_never_mixed(tmp_path: Path) -> None:
    """A rank at another step cannot even join the staging (its token names the step); were its report
    to say another step anyway, rank 0 would refuse to commit."""
    store = CheckpointStore(str(tmp_path / "run"))
    with pytest.raises(StorageError, match="is not a staging folder of ckpt-000000000004"):
        _ranks(store, steps=(5, 4))
    writers, metadata, results = _ranks(store, steps=(6, 6))
    forged = [replace(r, storage_data=replace(r.storage_data, step=3)) if isinstance(r.storage_data, RankReport)
              else r for r in results[1]]
    with pytest.raises(RuntimeError, match="rank 1 saved step 3, rank 0 step 6"):
        writers[0].finish(metadata, [results[0], forged])
    assert [c.step for c in store.list()] == []
