"""A small torch training worker for the hand-over tests: deterministic, saves every --every steps.

Prints `resumed <step>` (-1 for a fresh start) once restored, and `DONE <step>` at the end.
"""
import argparse
import os
import random
import time

import numpy

import torch

import savegame

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=200)
parser.add_argument("--every", type=int, default=5)
parser.add_argument("--sleep", type=float, default=0.01)
parser.add_argument("--width", type=int, default=256)
parser.add_argument("--dir", default=None)
parser.add_argument("--keep-last", type=int, default=None)
args = parser.parse_args()

random.seed(0)  # the saved state holds every RNG: seeded, two runs save identical bytes
numpy.random.seed(0)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
ckpt = savegame.Checkpointer(args.dir, every_steps=args.every, keep_last=args.keep_last)
ckpt.track(model=model, optimizer=optimizer)
info = ckpt.restore()
print(f"resumed {info.step if info is not None else -1} attempt {os.environ.get('SAVEGAME_ATTEMPT', '-')}", flush=True)
ckpt.start_training()
while ckpt.progress.step < args.steps:
    g = torch.Generator().manual_seed(ckpt.progress.step)  # the batch is a function of the step: exact resumes
    x = torch.randn(32, args.width, generator=g)
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ckpt.step()
    if args.sleep:
        time.sleep(args.sleep)
ckpt.finish()
print(f"DONE {ckpt.progress.step}", flush=True)
