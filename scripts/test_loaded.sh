#!/usr/bin/env bash
# The daemon, mirror and chaos tiers with both cores already busy (two busy loops), so tests that
# lean on timing show it: they must wait on observable events, never on sleeps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
loops=()
for _ in 1 2; do "$PY" -c "while True: pass" & loops+=($!); done
trap 'kill "${loops[@]}" 2>/dev/null || true' EXIT
"$PY" -m pytest -q -p no:cacheprovider \
  tests/integration/test_daemon.py tests/integration/test_daemon_start.py tests/integration/test_worker_lifecycle.py \
  tests/integration/test_mirror.py tests/integration/test_mirror_faults.py tests/integration/test_run_policy.py \
  tests/integration/test_systemd.py tests/hostile/test_event_socket.py tests/chaos "$@"
