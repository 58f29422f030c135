"""`savegame report DIR`: where the run's time went, attempt by attempt, and what became of its checkpoints.

Read from the run folder alone (`.savegame/attempts.jsonl`, `history.jsonl`, the listing), so it
works with or without a daemon; a running daemon's current attempt comes from its status file (a
daemon that is gone counts until its status's last update).
"""
from __future__ import annotations

import collections
import time
from datetime import datetime
from typing import Any, Mapping, Optional

from savegame.daemon.status import TERMINAL_STATES, read_status
from savegame.errors import MalformedInput, StorageError
from savegame.inspect_cmds import format_table, human_size
from savegame.see import goodput as g
from savegame.see.history import History, read_history
from savegame.storage.pids import process_alive


def report(store: Any) -> dict[str, Any]:
    run_dir = store.location.path
    try:
        ledger = g.load_ledger(run_dir)
    except (OSError, MalformedInput) as exc:
        raise StorageError(f"cannot read {g.attempts_file(run_dir)}: {exc}") from None
    daemon, attempt = _running(read_status(run_dir) or {})
    summary = g.summarize(g.with_open(ledger, daemon, attempt))
    record = read_history(store)
    listed = store.list()
    return {"run": run_dir, **summary.to_json(rows=True), "running": daemon is not None,
            "checkpoints": _checkpoints(record, listed), "records_skipped": ledger.skipped + record.skipped}


def _running(status: Mapping[str, Any]) -> tuple[Optional[g.DaemonLife], Optional[g.Attempt]]:
    """The daemon's records not written yet: until now if it lives, until its last status if not."""
    section, updated = status.get("ledger"), status.get("updated")
    if not isinstance(section, dict) or status.get("state") in TERMINAL_STATES or not isinstance(updated, float):
        return None, None
    try:
        found = g.parse_daemon({**(section.get("daemon") or {}), "ended": updated}, "status")
        now = max(time.time(), updated) if process_alive(found.pid) else updated
        daemon = g.DaemonLife(found.pid, found.started, now)
        raw = section.get("attempt")
        attempt = g.parse_attempt({**raw, "ended": max(now, raw.get("ready") or 0, raw.get("spawned") or 0)},
                                  "status") if isinstance(raw, dict) else None
    except (MalformedInput, TypeError, AttributeError):
        return None, None
    return daemon, attempt


def _checkpoints(record: History, listed: list[Any]) -> dict[str, Any]:
    steps = {c.step for c in record.commits} | {c.step for c in listed}
    by_reason = collections.Counter(c.reason or "unknown" for c in {c.step: c for c in record.commits}.values())
    for info in listed:
        if info.step not in {c.step for c in record.commits}:
            by_reason[info.reason] += 1
    return {"committed": len(steps), "by_reason": dict(by_reason), "failed": len(record.failed),
            "pruned": len({p.step for p in record.prunes} - {c.step for c in listed}), "kept": len(listed),
            "bytes_written": sum(c.bytes or 0 for c in record.commits)}


def format_report(data: Mapping[str, Any]) -> str:
    ckpt = data["checkpoints"]
    lines = [f"run {data['run']}: {data['attempts']} attempts, {data['daemons']} daemon(s), "
             f"{g.human_seconds(data['total_s'])} in all" + (" (running)" if data["running"] else ""),
             f"goodput:     {g.describe(data)}",
             f"down:        {g.human_seconds(data['down_s'])} with no daemon running (not counted)",
             "restarts:    " + (", ".join(f"{k} {v}" for k, v in sorted(data["restarts"].items())) or "none")
             + f"; preemptions {data['preemptions']}",
             f"checkpoints: {ckpt['committed']} committed ("
             + ", ".join(f"{k} {v}" for k, v in sorted(ckpt["by_reason"].items()))
             + f"), {ckpt['failed']} failed, {ckpt['pruned']} pruned, {ckpt['kept']} kept; "
             f"{human_size(ckpt['bytes_written'])} written"]
    if data["rows"]:
        lines += ["", format_table(["ATTEMPT", "STARTED", "RAN", "STEPS", "ENDED BY", "LOST"],
                                   [_attempt_cells(r) for r in data["rows"]])]
    if data["records_skipped"]:
        lines.append(f"({data['records_skipped']} record lines could not be read and were left out)")
    return "\n".join(lines)


def _attempt_cells(r: Mapping[str, Any]) -> list[str]:
    start = "-" if r["resumed_from"] is None else str(r["resumed_from"])
    end = "?" if r["last_step"] is None else str(r["last_step"])
    how = r["cause"] + (f" (exit {r['exit_code']})" if r["exit_code"] not in (None, 0) else "") \
        + (f" ({r['signal']})" if r["signal"] else "") + (", preempted" if r["preempted"] and r["cause"] != "preempted" else "")
    lost = f"{r['lost_steps']} steps ({g.human_seconds(r['redone_s'])})" if r["lost_steps"] else ""
    started = datetime.fromtimestamp(r["spawned"]).strftime("%Y-%m-%d %H:%M:%S")
    return [str(r["attempt"]), started, g.human_seconds(r["span_s"]), f"{start} -> {end}", how, lost]
