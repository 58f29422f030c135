#!/usr/bin/env bash
# Every benchmark, each printing JSON figures. Pass --quick for smaller sizes.
# One framework per process (TensorFlow and triton crash together): each bench runs on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
for bench in bench/bench_storage.py bench/bench_daemon.py bench/bench_handover.py bench/bench_handover_memory.py bench/bench_restore_ram.py bench/bench_torch.py bench/bench_keras.py bench/bench_interval.py bench/bench_distributed.py; do
  echo "## $bench" >&2
  .venv/bin/python "$bench" "$@"
done
