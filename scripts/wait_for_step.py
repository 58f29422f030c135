"""Wait until the worker of a `savegame run` reaches a step; print its PID and the step (demo helper).

The step comes from the progress cell the worker updates at every step boundary, the PID from the
daemon's status file.
"""
import json
import struct
import sys
import time
from pathlib import Path

run_dir, wanted = Path(sys.argv[1]), int(sys.argv[2])
deadline = time.monotonic() + float(sys.argv[3] if len(sys.argv) > 3 else 300)
while time.monotonic() < deadline:
    try:
        status = json.loads((run_dir / ".savegame" / "status.json").read_text())
        (step,) = struct.unpack("<q", (run_dir / ".savegame" / "progress").read_bytes()[:8])
    except (FileNotFoundError, ValueError, struct.error):
        status, step = {}, -1
    if status.get("state") == "running" and step >= wanted:
        print(status["worker_pid"], step)
        sys.exit(0)
    time.sleep(0.005)
sys.exit(f"the worker did not reach step {wanted}")
