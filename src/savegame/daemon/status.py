"""The daemon's status file: written atomically in the run folder, read by `savegame status`."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping, Optional

from savegame.storage.local import process_alive

STATUS_DIR = ".savegame"
STATUS_FILE = "status.json"
TERMINAL_STATES = ("succeeded", "stopped", "failed")


SETTINGS_FILE = "settings.json"


def status_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATUS_DIR, STATUS_FILE)


def settings_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATUS_DIR, SETTINGS_FILE)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    """Replace a small JSON file atomically (write a temporary file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(dict(data), f, indent=1, default=str)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_status(run_dir: str, status: Mapping[str, Any]) -> None:
    _write_json(status_path(run_dir), {**status, "updated": time.time()})


def read_status(run_dir: str) -> Optional[dict[str, Any]]:
    return _read_json(status_path(run_dir))


def write_worker_settings(run_dir: str, settings: Mapping[str, Any]) -> str:
    """The settings the user gave the daemon, for the worker (SAVEGAME_CONFIG) and for ls/prune."""
    _write_json(settings_path(run_dir), settings)
    return settings_path(run_dir)


def read_worker_settings(run_dir: str) -> Optional[dict[str, Any]]:
    return _read_json(settings_path(run_dir))


def _age(then: Optional[float], now: float) -> str:
    if not then:
        return "-"
    seconds = max(now - then, 0)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.1f}m ago"


def format_status(status: Mapping[str, Any], now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    state = status.get("state", "?")
    if state not in TERMINAL_STATES and not (status.get("daemon_pid") and process_alive(status["daemon_pid"])):
        state += " (the daemon is not running)"
    ckpt = status.get("last_checkpoint") or {}
    beat = status.get("heartbeat") or {}
    mirror = status.get("mirror") or {}
    restarts = status.get("restarts") or {}
    lines = [
        f"state:           {state}  ({status.get('reason', '')})",
        f"worker:          pid {status.get('worker_pid') or '-'}, attempt {status.get('attempt', 0)}",
        f"restarts:        {', '.join(f'{k} {v}' for k, v in sorted(restarts.items())) or 'none'}",
        "last checkpoint: " + (f"step {ckpt.get('step')} ({ckpt.get('reason')}), {_age(ckpt.get('time'), now)}"
                                if ckpt else "none yet"),
        "last heartbeat:  " + (f"step {beat.get('step')}, {beat.get('steps_per_s') or 0:.2f} steps/s, "
                                f"{_age(beat.get('time'), now)}" if beat else "none yet"),
    ]
    if mirror:
        lines.append(f"mirror:          {mirror.get('url')}: {mirror.get('pending', 0)} pending, last confirmed "
                     f"step {mirror.get('confirmed_step', '-')}, lag {mirror.get('lag_s') or 0:.1f}s")
    return "\n".join(lines)

