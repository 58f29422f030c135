"""The daemon's status file: written atomically in the run folder, read by `savegame status`.

It holds nothing secret (the mirror's URL is the redacted one, no storage options), is never
written through a symlink, and is read through the strict parser: a status file with wrong types
shows as "?" rather than a traceback.
"""
from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Mapping, Optional

from savegame.config import NODE_NAME
from savegame.daemon.ranks import format_ranks
from savegame.errors import MalformedInput
from savegame.files import replace_file
from savegame.see.goodput import describe
from savegame.storage.local import process_alive
from savegame.untrusted import load_json, read_regular_file

STATUS_DIR = ".savegame"
STATUS_FILE = "status.json"
SETTINGS_FILE = "settings.json"
TERMINAL_STATES = ("succeeded", "stopped", "failed")
MAX_STATUS_BYTES = 1 << 20


def status_path(run_dir: str, name: str = STATUS_FILE) -> str:
    return os.path.join(run_dir, STATUS_DIR, name)


def settings_path(run_dir: str, name: str = SETTINGS_FILE) -> str:
    return os.path.join(run_dir, STATUS_DIR, name)


def write_json_file(path: str, data: Mapping[str, Any]) -> None:
    """Replace a small JSON file atomically; the temporary file is new (never a planted link)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, json.dumps(dict(data), indent=1, default=str, allow_nan=False).encode())


def read_json_file(path: str) -> Optional[dict[str, Any]]:
    """A small JSON object from a regular file; None when it is missing, unreadable or malformed."""
    try:
        data = load_json(read_regular_file(path, MAX_STATUS_BYTES), what=path, max_bytes=MAX_STATUS_BYTES)
    except (OSError, MalformedInput):
        return None
    return data if isinstance(data, dict) else None


def write_status(run_dir: str, status: Mapping[str, Any], name: str = STATUS_FILE) -> None:
    write_json_file(status_path(run_dir, name), {**status, "updated": time.time()})


def read_status(run_dir: str) -> Optional[dict[str, Any]]:
    return read_json_file(status_path(run_dir))


def read_node_statuses(run_dir: str) -> dict[str, Optional[dict[str, Any]]]:
    """node -> status of every node's daemon of a run on several nodes (None: damaged); empty otherwise."""
    folder = os.path.join(run_dir, STATUS_DIR)
    found = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), "status.*.json"))):
        node = os.path.basename(path)[len("status."):-len(".json")]
        if NODE_NAME.fullmatch(node):
            found[node] = read_json_file(path)
    return found


def write_worker_settings(run_dir: str, settings: Mapping[str, Any], name: str = SETTINGS_FILE) -> str:
    """The settings the user gave the daemon, for the worker (SAVEGAME_CONFIG)."""
    write_json_file(settings_path(run_dir, name), settings)
    return settings_path(run_dir, name)


def _age(then: Any, now: float) -> str:
    if not isinstance(then, (int, float)) or isinstance(then, bool) or not then:
        return "-"
    seconds = max(now - then, 0)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.1f}m ago"


def _table(status: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = status.get(key)
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def format_status(status: Mapping[str, Any], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    state = str(status.get("state", "?"))
    daemon = status.get("daemon_pid")
    if state not in TERMINAL_STATES and not (isinstance(daemon, int) and 0 < daemon < 1 << 22 and process_alive(daemon)):
        state += " (the daemon is not running)"
    ckpt, beat, mirror, restarts = (_table(status, k) for k in ("last_checkpoint", "heartbeat", "mirror", "restarts"))
    lines = [
        f"state:           {state}  ({status.get('reason', '')})",
        f"worker:          pid {status.get('worker_pid') or '-'}, attempt {status.get('attempt', 0)}"
        + ("" if status.get("worker_ready", True) else " (starting)"),
        f"restarts:        {', '.join(f'{k} {v}' for k, v in sorted(restarts.items())) or 'none'}",
        "last checkpoint: " + (f"step {ckpt.get('step')} ({ckpt.get('reason')}), {_age(ckpt.get('time'), now)}"
                                if ckpt else "none yet"),
        "last heartbeat:  " + (f"step {beat.get('step')}, epoch {beat.get('epoch', '-')}, "
                                f"{_num(beat.get('steps_per_s')):.2f} steps/s, {_age(beat.get('time'), now)}"
                                if beat else "none yet"),
        f"best so far:     {_best(beat)}",
        f"policy:          {_policy(status)}",
    ]
    if isinstance(status.get("goodput"), dict):  # see/goodput.py; `savegame report` has the details
        lines.append(f"goodput:         {describe(status['goodput'])}")
    lines += format_ranks(status, now)
    if mirror:
        lines.append(f"mirror:          {mirror.get('url')}: {mirror.get('pending', 0)} pending, last confirmed "
                     f"step {mirror.get('confirmed_step', '-')}, lag {_num(mirror.get('lag_s')):.1f}s")
        if mirror.get("missing"):
            lines.append(f"                 NOT IN THE MIRROR: steps {mirror.get('missing')}")
    return "\n".join(lines)


def _best(beat: Mapping[str, Any]) -> str:
    monitor, best = beat.get("monitor"), beat.get("best")
    if not isinstance(monitor, str):
        return "- (no metric monitored)"
    return f"{monitor} {_num(best):.4g}" if isinstance(best, (int, float)) else f"{monitor}: none yet"


def _policy(status: Mapping[str, Any]) -> str:
    """The effective policy in one line: regime, what "best" means, what is saved and kept."""
    policy = _table(status, "policy")
    if not policy:
        return "-"
    save, keep = _table(policy, "save"), _table(policy, "keep")
    saves = [f"every {v} {unit}" for key, unit in (("every_steps", "steps"), ("every_epochs", "epochs"),
                                                   ("every_seconds", "s")) if (v := save.get(key))]
    if save.get("on_improvement") and policy.get("monitor"):
        saves.append("on improvement")
    kept = [f"last {keep.get('last', 0)}", f"best {keep.get('best', 0)}"]
    if keep.get("every"):
        kept.append(f"every {keep['every']} {keep.get('every_unit', 'step')}s")
    if keep.get("thin"):
        kept.append(f"{len(keep['thin'])} thinning tiers")
    monitor = f"{policy.get('monitor')} ({policy.get('mode')})" if policy.get("monitor") else "no metric"
    known = "" if status.get("policy_known", True) else " (not known yet: no retention runs)"
    return (f"{policy.get('regime')}: monitor {monitor}, save {', '.join(saves) or 'at the end only'}, "
            f"keep {', '.join(kept)}, resume {policy.get('resume')}{known}")
