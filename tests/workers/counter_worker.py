"""A small, real training worker for the daemon tests: NumPy state with exact step accounting.

Every step adds 1 to every weight and records the step, so a checkpoint's weights equal its step
and the recorded steps must be exactly 0..N-1: a step done twice or skipped shows up.
It can also log each step to an outside file (not checkpointed), crash, hang or ignore SIGTERM.
"""
import argparse
import os
import signal
import sys
import time

import numpy as np

import savegame

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=100)
parser.add_argument("--sleep", type=float, default=0.0)
parser.add_argument("--size-mb", type=float, default=1.0)
parser.add_argument("--every", type=int, default=5)
parser.add_argument("--epoch-steps", type=int, default=0, help="steps per epoch (0: one epoch)")
parser.add_argument("--log", help="append each completed step to this file")
parser.add_argument("--print", action="store_true", help="print a line at every step")
parser.add_argument("--ignore-term", action="store_true")
parser.add_argument("--crash-at", type=int, help="exit 3 whenever this step is reached")
parser.add_argument("--crash-after-load", type=int, help="exit 3 right after resuming from this step")
parser.add_argument("--crash-once-at", type=int, help="exit 3 at this step on the first attempt only")
parser.add_argument("--abort-after-finish", action="store_true",
                    help="SIGABRT after the final checkpoint, on the first attempt only (a crash in teardown)")
parser.add_argument("--hang-at", type=int, help="hang at this step on the first attempt")
parser.add_argument("--pause-at", type=int, help="one slow step: pause at this step (every attempt)")
parser.add_argument("--pause-for", type=float, default=0.0, help="seconds of the --pause-at step")
parser.add_argument("--metric", action="store_true", help="report a loss at each epoch end")
parser.add_argument("--best-epoch", type=int, help="with --metric: the loss is lowest at this epoch")
args = parser.parse_args()

weights = np.zeros(max(1, int(args.size_mb * 2**20 / 4)), dtype=np.float32)
epoch_steps = args.epoch_steps or args.steps
ckpt = savegame.Checkpointer(every_steps=args.every, monitor="loss" if args.metric else None, mode="min",
                             steps_per_epoch=epoch_steps)  # so a save due at an epoch's last step is not put off
ckpt.track(weights=weights)
info = ckpt.restore()
if info is not None and not np.all(weights == ckpt.progress.step):
    sys.exit(f"restored weights {weights[:3]} do not match step {ckpt.progress.step}")
if info is not None and info.step == args.crash_after_load:
    os._exit(3)
if args.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
seen = ckpt.state.setdefault("seen", [])
log = open(args.log, "a") if args.log else None
ckpt.start_training()  # stop signals are handled from here on: the first step is covered too

while ckpt.progress.step < args.steps:
    step = ckpt.progress.step
    if step == args.crash_at or (step == args.crash_once_at and os.environ.get("SAVEGAME_ATTEMPT", "1") == "1"):
        ckpt.flush()  # the checkpoint before the crash is committed: deterministic, however loaded the machine
        os._exit(3)
    if step == args.hang_at and os.environ.get("SAVEGAME_ATTEMPT", "1") == "1":
        time.sleep(3600)
    if step == args.pause_at:
        time.sleep(args.pause_for)
    weights += 1
    seen.append(step)
    if log:
        log.write(f"{step}\n")
        log.flush()
    if args.print:
        print(f"step {step}", flush=True)
    time.sleep(args.sleep)
    if args.print:  # output inside a step too, as a progress bar would print
        print(f"step {step} done", flush=True)
    ckpt.step()
    if ckpt.progress.step % epoch_steps == 0:
        epoch = ckpt.progress.epoch + 1
        loss = 1.0 + abs(epoch - args.best_epoch) if args.best_epoch is not None else 1.0 / ckpt.progress.step
        ckpt.end_epoch(**({"loss": loss} if args.metric else {}))

ckpt.finish()
assert seen == list(range(args.steps)), "steps done twice or skipped"
assert np.all(weights == args.steps)
print(f"DONE {args.steps}", flush=True)
if args.abort_after_finish and os.environ.get("SAVEGAME_ATTEMPT", "1") == "1":
    os.abort()
