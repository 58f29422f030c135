"""A tiny FSDP2 (fully_shard) job for tests, one process per rank under torchrun (CPU, gloo).

    fsdp_worker.py --dir D --steps N --dump OUT.safetensors [--every K]

Trains N steps of an MLP whose layers are sharded over the ranks (a row count that does not divide
evenly, so shards differ in size), saving every K steps and at the end; resumes from D when there
is a checkpoint. Rank 0 then writes the full (gathered) model and optimizer state to OUT, so a test
can compare what a job of another size resumed with against what was saved.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import fully_shard

from savegame import Checkpointer


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model, options=options).items()}
    optim = get_optimizer_state_dict(model, optimizer, options=options)
    if not optim:
        return {}  # gathered on rank 0 only
    for fqn, state in optim["state"].items():
        for key, value in state.items():
            flat[f"optim.{fqn}.{key}"] = torch.as_tensor(value)
    flat["optim.lr"] = torch.tensor(optim["param_groups"][0]["lr"])
    return {k: v.detach().clone().contiguous() for k, v in flat.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=0)
    p.add_argument("--dump", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo", timeout=timedelta(minutes=5))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 5))  # 9 and 5 rows: uneven shards
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    ckpt = Checkpointer(args.dir, every_steps=args.every or None)
    ckpt.track(model=model, optimizer=optimizer)
    resumed = ckpt.restore()
    if rank == 0:
        print(f"resumed from step {resumed.step}" if resumed else "fresh", flush=True)
    torch.manual_seed(100 + rank + ckpt.progress.step)
    while ckpt.progress.step < args.steps:
        x = torch.randn(4, 6)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ckpt.step()
    ckpt.finish()
    state = full_state(model, optimizer)
    if rank == 0:
        save_file(state, args.dump)
        print(f"dumped step {ckpt.progress.step}", flush=True)
    dist.destroy_process_group()
    # Leave without the interpreter's finalization (a torch bug, 3 runs in ~350 under load, with or
    # without savegame in the script): a gloo worker thread may drop the last reference to a finished
    # collective of the gather above only after the script ended; its Python-owned tensors then need
    # the GIL of an interpreter being torn down, and the thread's forced unwind ends in std::terminate
    # (a core dump: ProcessGroupGloo::runLoop -> ~Async...Work -> gil_scoped_acquire -> pthread_exit,
    # the main thread in Py_FinalizeEx). torchrun would report the job failed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
