"""`savegame history`: one row per checkpoint the run ever committed, kept or not.

The store's listing says what is there now (and, by the run's policy, why it is kept: the same
reasons `ls` gives); the stored history adds what was committed and is gone, and why it went.
"""
from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Optional

from savegame.inspect_cmds import format_table, human_size, ls_rows
from savegame.see.history import Commit, History, Prune, iso, read_history

COLUMNS = ("step", "epoch", "reason", "status", "attempt", "committed", "bytes", "why")
NO_RECORD = "gone, without a record of why (deleted outside savegame, or before its history began)"
NOT_MIRRORED = "not in the bucket, without a record of a deletion (never uploaded: the mirror's policy " \
               "did not keep it, or it was not uploaded yet)"


def history_rows(store: Any, config: Any, protected: Mapping[int, str]) -> tuple[list[dict[str, Any]], History]:
    """The rows, oldest first, and the history they came from (for its `skipped` count)."""
    record = read_history(store)
    listed = {r["step"]: r for r in ls_rows(store, config, protected, include_problems=True)}
    commits: dict[int, Commit] = {}
    for c in sorted(record.commits, key=lambda c: c.time):
        commits[c.step] = c  # a step committed again (after a rollback) shows its latest commit
    prunes: dict[int, list[Prune]] = {}
    for p in sorted(record.prunes, key=lambda p: p.time):
        prunes.setdefault(p.step, []).append(p)
    missing = NO_RECORD if store.is_local else NOT_MIRRORED  # a bucket's copy tells of local commits too
    rows = [_row(step, commits.get(step), listed.get(step), prunes.get(step, []), missing)
            for step in sorted(set(commits) | set(listed))]
    return rows, record


def _row(step: int, commit: Optional[Commit], now: Optional[Mapping[str, Any]], prunes: list[Prune],
         missing: str) -> dict[str, Any]:
    committed = now is not None and now["status"] == "committed"
    source: Mapping[str, Any] = now if committed else {}  # the manifest, when there is one, is the truth
    pruned = [{"tier": p.tier, "by": p.by, "why": p.why, "time": iso(p.time)} for p in prunes]
    if committed:
        status, why = "kept", list(now["keep"]) or ["(prune would delete)"]  # type: ignore[index]
    elif now is not None:
        status, why = now["status"], [str(now.get("problem"))]
    else:
        status = "pruned" if prunes else "gone"
        why = [f"{p.tier} ({p.by}): {p.why}" for p in prunes] or [missing]
    return {"step": step, "epoch": source.get("epoch", commit.epoch if commit else None),
            "reason": source.get("reason", commit.reason if commit else None),
            "metrics": dict(source.get("metrics", commit.metrics if commit else {})),
            "bytes": source.get("bytes", commit.bytes if commit else None),
            "committed": source.get("created") or (iso(commit.time) if commit else None),
            "attempt": commit.attempt if commit else None, "status": status, "why": why, "pruned": pruned}


def format_rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no checkpoints, and no history"
    table = [[str(r["step"]), _dash(r["epoch"]), r["reason"] or "-",
              " ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items())) or "-", _dash(r["attempt"]),
              human_size(r["bytes"]), r["status"], "; ".join(r["why"])] for r in rows]
    return format_table(["STEP", "EPOCH", "REASON", "METRICS", "ATTEMPT", "SIZE", "STATUS", "WHY"], table)


def csv_rows(rows: list[dict[str, Any]]) -> str:
    """CSV with one column per metric name after the fixed ones."""
    metrics = sorted({name for r in rows for name in r["metrics"]})
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*COLUMNS, *metrics])
    for r in rows:
        writer.writerow([*("" if r[c] is None else ("; ".join(r[c]) if c == "why" else r[c]) for c in COLUMNS),
                         *(r["metrics"].get(name, "") for name in metrics)])
    return out.getvalue()


def _dash(value: Any) -> str:
    return "-" if value is None else str(value)
