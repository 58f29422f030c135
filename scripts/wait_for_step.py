"""Wait until the worker of a `savegame run` reaches a step; print the worker's PID (demo helper)."""
import json
import sys
import time
from pathlib import Path

run_dir, wanted = Path(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + float(sys.argv[3] if len(sys.argv) > 3 else 300)
while time.monotonic() < deadline:
    try:
        status = json.loads((run_dir / ".savegame" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        status = {}
    if status.get("state") == "running" and (status.get("heartbeat") or {}).get("step", -1) >= wanted:
        print(status["worker_pid"])
        sys.exit(0)
    time.sleep(0.1)
sys.exit(f"the worker did not reach step {wanted}")
