"""The inspection commands (ls, verify, prune, restore): data first, text second.

Each command builds plain rows (what --json prints), and a formatter turns them into a table.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any, Mapping, Optional

from savegame.config import RunConfig
from savegame.errors import CheckpointNotFound, ConfigError, StorageError
from savegame.see.history import prune_why, record_prune
from savegame.see.progress import bar
from savegame.storage import CheckpointInfo, CheckpointStore, copy_checkpoint
from savegame.storage.manifest import parse_time
from savegame.strategies import plan_retention, resume_candidates

log = logging.getLogger("savegame")


def open_existing(url: str, storage_options: Optional[Mapping[str, Any]] = None) -> CheckpointStore:
    store = CheckpointStore(url, storage_options)
    if not store.exists():
        raise ConfigError(f"{store.url} does not exist; check the path (or the bucket name)")
    return store


def _plan(store: CheckpointStore, checkpoints: list[CheckpointInfo], config: RunConfig,
          protected: Mapping[int, str], now: datetime):
    tier = "local" if store.is_local else "mirror"  # a bucket follows [mirror_keep]
    return plan_retention(checkpoints, config.retention(tier), now, monitor=config.monitor,  # type: ignore[arg-type]
                          protected=protected)


def ls_rows(store: CheckpointStore, config: RunConfig, protected: Mapping[int, str],
            include_problems: bool = True, now: Optional[datetime] = None) -> list[dict[str, Any]]:
    """One row per committed checkpoint (and, with `include_problems`, per damaged, incomplete or
    quarantined folder, marked by its "status")."""
    now = now or datetime.now(timezone.utc)
    scan = store.scan()
    plan = _plan(store, scan.committed, config, protected, now)
    rows = [{"step": c.step, "epoch": c.epoch, "reason": c.reason, "metrics": dict(c.metrics),
             "created": c.manifest.created, "bytes": c.bytes, "path": c.path, "status": "committed",
             "keep": plan.keep.get(c.step, []),
             **({"world_size": c.manifest.world_size} if c.manifest.world_size else {})}  # sharded: its ranks
            for c in scan.committed]
    problem_kinds = (("damaged", scan.damaged), ("incomplete", scan.incomplete), ("quarantined", scan.quarantined))
    for status, problems in problem_kinds if include_problems else ():
        rows += [{"step": p.step, "epoch": None, "reason": None, "metrics": {}, "created": None, "bytes": None,
                  "path": store.path_of(p.name), "status": status, "problem": p.problem, "keep": []}
                 for p in problems]
    return sorted(rows, key=lambda r: (r["step"], r["status"]))


def verify_rows(store: CheckpointStore, step: Optional[int] = None) -> list[dict[str, Any]]:
    """One row per committed or damaged checkpoint. A folder without a manifest (a save or a delete in
    progress, or its leftover) is not a checkpoint and not damage: `ls --all` shows it. A checkpoint
    found damaged is looked at again: one deleted meanwhile (retention of a running run) is no damage."""
    scan = store.scan()
    chosen = [c for c in scan.committed if step is None or c.step == step]
    with bar(sum(_size(c) for c in chosen), f"verifying {len(chosen)} checkpoint(s)") as advance:
        rows = []
        for c in chosen:
            problems = _problems(store, c)
            rows.append({"step": c.step, "path": c.path, "ok": not problems, "problems": problems})
            advance(_size(c))
    for problem in scan.damaged:
        if step is None or problem.step == step:
            rows.append({"step": problem.step, "path": store.path_of(problem.name), "ok": False,
                         "problems": [problem.problem]})
    if any(not r["ok"] for r in rows):
        again = store.scan()
        still = {c.step for c in again.committed} | {p.step for p in again.damaged}
        rows = [r for r in rows if r["ok"] or r["step"] in still]
    if step is not None and not rows:
        raise CheckpointNotFound(f"{store.url}: no checkpoint at step {step}; `savegame ls {store.url}` lists them")
    return sorted(rows, key=lambda r: r["step"])


def _size(info: CheckpointInfo) -> int:
    return sum(entry.bytes for entry in info.manifest.files)


def _problems(store: CheckpointStore, info: CheckpointInfo) -> list[str]:
    try:
        return store.verify(info)
    except StorageError as exc:  # the folder went away while we looked (retention), or cannot be read
        return [str(exc.strerror or exc)]


def prune(store: CheckpointStore, config: RunConfig, protected: Mapping[int, str], dry_run: bool,
          now: Optional[datetime] = None) -> dict[str, Any]:
    """Delete what the policy does not keep, then collect stale staging.

    Never deletes anything damaged or uncommitted: what would go is verified first.
    """
    now = now or datetime.now(timezone.utc)
    checkpoints = store.list()
    plan = _plan(store, checkpoints, config, protected, now)
    by_step = {c.step: c for c in checkpoints}
    damaged = _damaged(store, [by_step[s] for s in plan.delete])
    keep = {**plan.keep, **{s: [f"damaged, kept for inspection: {'; '.join(p)}"] for s, p in damaged.items()}}
    delete = [s for s in plan.delete if s not in damaged]
    result = {"keep": [{"step": s, "why": why} for s, why in sorted(keep.items())],
              "delete": [{"step": s, "path": by_step[s].path} for s in delete], "collect": [], "collected": []}
    if dry_run:
        result["collect"] = store.garbage(config["stale_after"])  # shown, not removed
        return result
    for step in delete:
        store.delete(step)
        # debug: the command prints each deletion itself; stderr stays for problems
        log.debug("deleted step %d (%s): not kept by the %s policy", step, by_step[step].path, config.regime)
        record_prune(store, step, "savegame prune", prune_why(config, "local" if store.is_local else "mirror"))
    result["collect"] = result["collected"] = store.collect_garbage(config["stale_after"])
    return result


def _damaged(store: CheckpointStore, checkpoints: list[CheckpointInfo]) -> dict[int, list[str]]:
    """Problems of the checkpoints about to be deleted: a damaged one is evidence, so it stays."""
    return {c.step: problems for c in checkpoints if (problems := store.verify(c))}


def choose(store: CheckpointStore, which: str, step: Optional[int], config: RunConfig) -> CheckpointInfo:
    checkpoints = store.list()
    if which == "step":
        return store.get(step)  # type: ignore[arg-type]
    monitor = config.monitor
    if which == "best" and monitor is None:
        raise ConfigError("--best needs --monitor NAME (and --mode min|max)")
    candidates = resume_candidates(checkpoints, which, *(monitor or (None, "max")))  # type: ignore[arg-type]
    if not candidates:
        raise CheckpointNotFound(f"{store.url}: no committed checkpoint to restore")
    return candidates[0]


def restore(store: CheckpointStore, info: CheckpointInfo, to: str) -> CheckpointInfo:
    """Copy one checkpoint into the local run root `to` (verified byte by byte), ready to resume from."""
    dest = CheckpointStore(to)
    if not dest.is_local:
        raise ConfigError(f"--to must be a local folder, not {to}")
    with bar(_size(info), f"restoring step {info.step}") as advance:  # drawn on a terminal only
        return copy_checkpoint(store, info, dest, progress=advance)


def human_size(n: Optional[int]) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def human_age(created: Optional[str], now: datetime) -> str:
    if not created:
        return "-"
    seconds = (now - parse_time(created)).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def format_ls(rows: list[dict[str, Any]], now: Optional[datetime] = None) -> str:
    now = now or datetime.now(timezone.utc)
    table = []
    for r in rows:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        why = ", ".join(r["keep"]) if r["status"] == "committed" else f"{r['status'].upper()}: {r.get('problem')}"
        if r["status"] == "committed" and not r["keep"]:
            why = "(prune would delete)"
        table.append([str(r["step"]), "-" if r["epoch"] is None else str(r["epoch"]), r["reason"] or "-",
                      metrics or "-", human_size(r["bytes"]), human_age(r["created"], now), why])
    if not table:
        return "no checkpoints"
    return format_table(["STEP", "EPOCH", "REASON", "METRICS", "SIZE", "AGE", "KEPT BECAUSE"], table)
