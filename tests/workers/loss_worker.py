"""A small deterministic training run whose data can poison it: NumPy weights pulled towards each
batch, a loss that the Checkpointer watches (`ckpt.report`), and batches that produce a NaN or a
spike when asked. `--drop E:B` is the reference: the script itself leaves that batch out.

Prints `final-weights-sha256 <hex>` at the end, so runs can be compared bit for bit.
"""
import argparse
import hashlib
import os
import time

import numpy as np

import savegame


def position(text):
    epoch, batch = text.split(":")
    return int(epoch), int(batch)


parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--steps-per-epoch", type=int, default=20)
parser.add_argument("--every", type=int, default=4)
parser.add_argument("--nan-at", type=position, help="the batch at EPOCH:BATCH holds a NaN")
parser.add_argument("--spike-at", type=position, help="the batch at EPOCH:BATCH is 1000 times too large")
parser.add_argument("--drop", type=position, help="the reference: leave the batch at EPOCH:BATCH out")
parser.add_argument("--pause-at", type=position, help="sleep --pause seconds before training EPOCH:BATCH (first time)")
parser.add_argument("--pause", type=float, default=0.0)
parser.add_argument("--rollback", help="on=nan,spike;skip: the rollback setting given to Checkpointer(...)")
args = parser.parse_args()

rollback = None
if args.rollback:
    kinds, _, skip = args.rollback.partition(";")
    rollback = {"on": kinds.split(","), "skip_batches": skip == "skip", "max": 2}
weights = np.zeros(64, dtype=np.float64)
ckpt = savegame.Checkpointer(every_steps=args.every, steps_per_epoch=args.steps_per_epoch, rollback=rollback)
ckpt.track(weights=weights)
ckpt.restore()
if not np.all(np.isfinite(weights)):
    raise SystemExit("resumed from a poisoned checkpoint")


def batch_data(epoch, index):
    data = np.random.default_rng(1000 * epoch + index).normal(1.0, 0.1, size=64)
    if (epoch, index) == args.nan_at:
        data[7] = np.nan
    if (epoch, index) == args.spike_at:
        data *= 1000.0
    return data


for epoch in ckpt.epochs(args.epochs):
    for index in ckpt.batches(range(args.steps_per_epoch)):
        if (epoch, index) == args.drop:
            continue
        if (epoch, index) == args.pause_at and os.environ.get("SAVEGAME_ATTEMPT", "1") == "1":
            time.sleep(args.pause)  # the mirror uploads what was saved so far meanwhile
        x = batch_data(epoch, index)
        loss = float(np.mean((weights - x) ** 2))
        weights -= 0.05 * (weights - x)
        ckpt.report(loss)

ckpt.finish()
print("final-weights-sha256", hashlib.sha256(weights.tobytes()).hexdigest(), flush=True)
