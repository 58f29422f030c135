"""The tutorial's PyTorch MNIST CNN under DistributedDataParallel, on savegame: one script per rank.

Every rank trains on its share of each epoch (ResumableSampler shards by rank, like
DistributedSampler) and tracks the DDP model with the same Checkpointer calls as the one-process
example. Checkpoints are sharded: each rank writes its own part (the replicated weights once, its
RNG states and data position), rank 0 commits one manifest for all; a SIGTERM to any rank (or to
the daemon) makes every rank stop at the same step and write one emergency checkpoint.

    torchrun --standalone --nproc-per-node 2 examples/pytorch_ddp_mnist.py --epochs 2
    savegame run --dir runs/ddp -- torchrun --standalone --nproc-per-node 2 --max-restarts 0 \\
        examples/pytorch_ddp_mnist.py --epochs 10

Rank 0 ends by printing `final-weights-sha256 <hex>`, like the one-process example. CPU ranks use
gloo; with one GPU per rank, NCCL (not run on a GPU here).
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from savegame import Checkpointer
from savegame.torch import ResumableSampler, weights_sha256

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_data import load_mnist  # noqa: E402
from pytorch_mnist_cnn import Net, parse_args  # noqa: E402


def join_job() -> torch.device:
    """Join the torchrun job: NCCL with one GPU per rank, gloo on CPUs."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("cpu:gloo,cuda:nccl", timeout=timedelta(minutes=10))
        return device
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    return torch.device("cpu")


def make_loaders(args, world: int) -> tuple[DataLoader, DataLoader]:
    x_train, y_train, x_val, y_val = load_mnist(args.data_root, seed=args.seed)
    if args.limit_batches:  # every rank gets --limit-batches batches per epoch
        keep = args.limit_batches * args.batch_size * world
        x_train, y_train = x_train[:keep], y_train[:keep]
    train = TensorDataset(torch.from_numpy(x_train).unsqueeze(1), torch.from_numpy(y_train))
    val = TensorDataset(torch.from_numpy(x_val).unsqueeze(1), torch.from_numpy(y_val))
    sampler = ResumableSampler(train, shuffle=True, seed=args.seed)  # this rank's share, resumable mid-epoch
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    val_share = ResumableSampler(val, shuffle=False)
    return train_loader, DataLoader(val, batch_size=1000, sampler=val_share)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    """Loss and accuracy over the whole validation set: each rank its share, summed over the job."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        out = model(x.to(device))
        totals[0] += F.nll_loss(out, y.to(device), reduction="sum").item()
        totals[1] += int((out.argmax(1) == y.to(device)).sum())
        totals[2] += len(y)
    dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = join_job()
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed + rank)  # dropout draws differ per rank; DDP starts from rank 0's weights
    torch.use_deterministic_algorithms(args.deterministic)
    train_loader, val_loader = make_loaders(args, world)
    torch.manual_seed(args.seed)
    model = DistributedDataParallel(Net().to(device))
    torch.manual_seed(args.seed + rank)
    if args.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)

    ckpt = Checkpointer(args.dir, monitor="val_acc", mode="max", every_steps=args.save_every_steps or None)
    ckpt.track(model=model, optimizer=optimizer, scheduler=scheduler)
    resumed = ckpt.restore()
    if rank == 0:
        print(f"resumed from step {resumed.step} (epoch {ckpt.progress.epoch}, batch {ckpt.progress.batch_in_epoch}) "
              f"with {world} ranks" if resumed else f"training from scratch with {world} ranks", flush=True)

    for epoch in ckpt.epochs(args.epochs):
        model.train()
        for x, y in ckpt.batches(train_loader):
            optimizer.zero_grad()
            loss = F.nll_loss(model(x.to(device)), y.to(device))
            loss.backward()
            optimizer.step()
            if rank == 0 and args.log_every and (ckpt.progress.step + 1) % args.log_every == 0:
                print(f"step {ckpt.progress.step + 1} loss {loss.item():.4f}", flush=True)
        scheduler.step()
        with ckpt.keepalive("evaluating"):
            val_loss, val_acc = evaluate(model, val_loader, device)
        ckpt.end_epoch(val_acc=val_acc, val_loss=val_loss)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: val_loss {val_loss:.4f} val_acc {val_acc:.4f} "
                  f"(best {ckpt.best:.4f})", flush=True)

    ckpt.finish()
    if rank == 0:
        print(f"final-weights-sha256 {weights_sha256(model.module)}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
