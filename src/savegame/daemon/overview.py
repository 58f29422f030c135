"""All runs at a glance: `savegame status --all ROOT` (e.g. /var/lib/savegame, one folder per unit).

A run folder is a folder one level below ROOT that holds `.savegame/`. Each gets one row: its
daemon's state, worker, restarts by cause, the newest checkpoint (step, age) and the best one by the
run's metric (both from the folder's own listing: storage is the truth, and it holds for a dead
daemon too), and the mirror's lag. A row has a `problem` when the run failed, when it is stale (not
finished, and its daemon is gone or has not rewritten its status for `stale_after_s`; it rewrites it
every second except while it prepares a resume), when the mirror lacks checkpoints it should hold,
or when the folder or its status cannot be read. Any problem makes the command exit 1.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional

from savegame.daemon.status import STATUS_DIR, TERMINAL_STATES, read_status, status_path
from savegame.errors import ConfigError, StorageError
from savegame.storage.pids import process_alive
from savegame.strategies import rank_by_metric, resolve_mode

DEFAULT_STALE_AFTER_S = 120.0
NO_AGE_CHECK = ("starting",)  # a start-up download may keep the loop (and the status) busy for long


def run_folders(root: str) -> list[str]:
    """The names of the run folders below `root`, sorted (hidden folders are not runs)."""
    if os.path.isdir(os.path.join(root, STATUS_DIR)):
        raise ConfigError(f"{root} is a run folder itself: use `savegame status {root}`, or give the folder "
                          "that holds the run folders")
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        raise ConfigError(f"{root} does not exist; give the folder that holds the run folders") from None
    except NotADirectoryError:
        raise ConfigError(f"{root} is not a folder; give the folder that holds the run folders") from None
    except PermissionError:
        raise ConfigError(f"cannot read {root} (permission denied); run as the user the runs belong to") from None
    names = []
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        if not os.access(entry.path, os.R_OK | os.X_OK) or os.path.isdir(os.path.join(entry.path, STATUS_DIR)):
            names.append(entry.name)  # one the caller cannot look into is shown (as a problem), never left out
    return names


def overview(root: str, stale_after_s: float = DEFAULT_STALE_AFTER_S,
             now: Optional[float] = None) -> list[dict[str, Any]]:
    """One row per run folder below `root`."""
    now = time.time() if now is None else now
    return [run_row(os.path.join(root, name), name, stale_after_s, now) for name in run_folders(root)]


def run_row(path: str, name: str, stale_after_s: float, now: float) -> dict[str, Any]:
    row: dict[str, Any] = {"run": name, "dir": path, "state": None, "problem": None, "stale": False,
                           "daemon_pid": None, "worker_pid": None, "restarts": {}, "last_checkpoint": None,
                           "best": None, "mirror": None, "status_age_s": None}
    if not os.access(path, os.R_OK | os.X_OK) or not os.access(os.path.join(path, STATUS_DIR), os.R_OK | os.X_OK):
        row["problem"] = "cannot read the run folder (permission denied): run as the user the run belongs to"
        return row
    status = read_status(path)
    if status is None:
        if os.path.lexists(status_path(path)):
            row["problem"] = "the status file is damaged (not one savegame wrote)"
        else:
            row["state"] = "no daemon"  # a script run on its own, without `savegame run`
    else:
        _from_status(row, status, stale_after_s, now)
    _from_listing(row, path, (status or {}).get("policy"), now)
    return row


def _from_status(row: dict[str, Any], status: Mapping[str, Any], stale_after_s: float, now: float) -> None:
    state = status.get("state") if isinstance(status.get("state"), str) else "?"
    daemon = _integer(status.get("daemon_pid"))
    updated = status.get("updated")
    age = max(0.0, now - updated) if _is_number(updated) else None
    row.update(state=state, daemon_pid=daemon, worker_pid=_integer(status.get("worker_pid")), status_age_s=age,
               restarts={k: v for k, v in _table(status, "restarts").items() if isinstance(v, int)})
    if state == "failed":
        row["problem"] = f"failed: {status.get('reason') or 'no reason given'}"
    elif state not in TERMINAL_STATES:
        if daemon is None or not process_alive(daemon):
            row["problem"] = f"stale: its daemon (pid {daemon}) is gone while {state}"
        elif state not in NO_AGE_CHECK and (age is None or age > stale_after_s):
            shown = "ever" if age is None else f"{age:.0f}s"
            row["problem"] = f"stale: its daemon (pid {daemon}) has not updated the status for {shown}"
        row["stale"] = row["problem"] is not None
    mirror = _table(status, "mirror")
    if mirror:
        missing = mirror.get("missing") if isinstance(mirror.get("missing"), list) else []
        row["mirror"] = {"url": mirror.get("url"), "pending": mirror.get("pending"), "lag_s": mirror.get("lag_s"),
                         "missing": missing, "error": mirror.get("error")}
        if missing and not row["problem"]:
            row["problem"] = f"the mirror does not hold steps {missing}"


def _from_listing(row: dict[str, Any], path: str, policy: Any, now: float) -> None:
    from savegame.storage import CheckpointStore

    try:
        checkpoints = CheckpointStore(path).list()
    except (StorageError, ConfigError, OSError) as exc:
        row["problem"] = row["problem"] or f"cannot list the checkpoints: {getattr(exc, 'strerror', None) or exc}"
        return
    if checkpoints:
        newest = checkpoints[-1]
        row["last_checkpoint"] = {"step": newest.step, "reason": newest.reason,
                                  "age_s": max(0.0, now - newest.created.timestamp())}
    metric = policy.get("monitor") if isinstance(policy, dict) else None
    if isinstance(metric, str) and metric:
        mode = resolve_mode(policy.get("mode") if policy.get("mode") in ("min", "max") else "auto", metric)
        ranked = rank_by_metric(checkpoints, metric, mode)
        if ranked:
            row["best"] = {"metric": metric, "mode": mode, "value": ranked[0].metrics[metric], "step": ranked[0].step}


def _table(status: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = status.get(key)
    return value if isinstance(value, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def _integer(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 22 else None


COLUMNS = ("RUN", "STATE", "WORKER", "RESTARTS", "LAST CHECKPOINT", "BEST", "MIRROR", "PROBLEM")


def format_overview(rows: list[dict[str, Any]]) -> str:
    """A table, one line per run, columns aligned."""
    table = [COLUMNS] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([*(cell.ljust(w) for cell, w in zip(line, widths)), line[-1]]).rstrip()
                     for line in table)


def _cells(row: Mapping[str, Any]) -> tuple[str, ...]:
    state = str(row["state"] or "?")
    shown = "FAILED" if state == "failed" else f"STALE ({state})" if row["stale"] else state
    restarts = ", ".join(f"{cause} {count}" for cause, count in sorted(row["restarts"].items())) or "-"
    last, best, mirror = row["last_checkpoint"], row["best"], row["mirror"]
    return (row["run"], shown, str(row["worker_pid"] or "-"), restarts,
            f"step {last['step']}, {_ago(last['age_s'])}" if last else "-",
            f"{best['metric']} {best['value']:.4g} @{best['step']}" if best else "-",
            _mirror_cell(mirror) if mirror else "-", row["problem"] or "")


def _mirror_cell(mirror: Mapping[str, Any]) -> str:
    lag = f"lag {mirror['lag_s']:.1f}s" if _is_number(mirror.get("lag_s")) else "lag -"
    pending = mirror.get("pending") if isinstance(mirror.get("pending"), int) else "?"
    return f"{lag}, {pending} pending" + (", ERROR" if mirror.get("error") else "")


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    return f"{seconds / 60:.0f}m ago" if seconds < 7200 else f"{seconds / 3600:.1f}h ago"
