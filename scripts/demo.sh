#!/usr/bin/env bash
# The main job, on local disk: a supervised PyTorch MNIST training (the tutorial's CNN) that is
# SIGKILLed mid-epoch (restarted by the daemon from its last checkpoint), then preempted with
# SIGTERM mid-epoch (emergency checkpoint, exit 0), then started again until it finishes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
RUN=${RUN_DIR:-demo-run}
TRAIN=("$BIN/python" examples/pytorch_mnist_cnn.py --epochs 5 --save-every-steps 25 --log-every 25)
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

rm -rf "$RUN"
say "savegame run --dir $RUN -- python examples/pytorch_mnist_cnn.py --epochs 5   (63 steps per epoch)"
"$BIN/savegame" run --dir "$RUN" -- "${TRAIN[@]}" &
daemon=$!
trap 'kill -TERM "$daemon" 2>/dev/null || true' EXIT  # never leave the run behind if a step fails

read -r worker step < <("$BIN/python" scripts/wait_for_step.py "$RUN" 90)
say "SIGKILL to the worker (pid $worker) at step $step, in the middle of epoch 2: the daemon restarts it from its last checkpoint"
kill -KILL "$worker"

read -r worker step < <("$BIN/python" scripts/wait_for_step.py "$RUN" 220)
say "SIGTERM to the daemon at step $step, in the middle of epoch 4 (a preemption notice): emergency checkpoint, then exit 0"
kill -TERM "$daemon"
wait "$daemon" && echo "savegame exited with 0"

say "the machine is back: the same command resumes at the next batch and finishes"
"$BIN/savegame" run --dir "$RUN" -- "${TRAIN[@]}"

say "savegame ls $RUN"
"$BIN/savegame" ls "$RUN"
say "savegame verify $RUN"
"$BIN/savegame" verify "$RUN"
