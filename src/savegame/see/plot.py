"""`savegame plot DIR --out run.png`: a run on one page (matplotlib, the optional extra savegame[plot]).

Top: the monitored metric at each checkpoint vs step, marked by reason (periodic, best, emergency,
final, manual), filled when kept and hollow when pruned; each worker death is a vertical line at the
step it had reached (red: a crash or a kill, orange: a preemption), and the work it lost is shaded.
Bottom: the step each attempt reached over wall-clock time, with its checkpoints: gaps are restarts,
drops are redone work. matplotlib is imported here only, with the headless Agg backend.
"""
from __future__ import annotations

import os
from datetime import datetime
from typing import Any, Optional

from savegame.errors import ConfigError
from savegame.see.report import report
from savegame.see.rows import history_rows

MARKERS = {"periodic": ("o", "tab:blue"), "best": ("*", "tab:green"), "emergency": ("^", "tab:red"),
           "final": ("s", "tab:purple"), "manual": ("D", "tab:gray"), None: ("o", "tab:gray")}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plot needs the matplotlib package: pip install 'savegame[plot]'") from None
    matplotlib.use("Agg")  # no display needed, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_run(store: Any, config: Any, metric: Optional[str], out: str) -> str:
    """Render the run into `out`; what was drawn, in one line."""
    plt = _pyplot()
    rows, _ = history_rows(store, config, {})
    data = report(store)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 8), gridspec_kw={"height_ratios": [3, 2]})
    try:
        shown = _metric_panel(top, rows, data["rows"], metric)
        _timeline_panel(bottom, rows, data["rows"])
        share = f", goodput {data['goodput'] * 100:.1f}%" if data["goodput"] is not None else ""
        fig.suptitle(f"{os.path.basename(store.location.path.rstrip('/'))}: {shown}{share}")
        fig.tight_layout()
        fig.savefig(out, dpi=110)
    finally:
        plt.close(fig)
    deaths = sum(1 for a in data["rows"] if a["cause"] not in ("finished", "running"))
    return f"wrote {out}: {len(rows)} checkpoints, {len(data['rows'])} attempts ({deaths} ended early), {shown}"


def _metric_panel(ax: Any, rows: list[dict], attempts: list[dict], metric: Optional[str]) -> str:
    with_metric = [r for r in rows if metric and metric in r["metrics"]]
    value = (lambda r: r["metrics"][metric]) if with_metric else (lambda r: r["epoch"] or 0)
    shown = metric if with_metric else "epoch (no metric reported)" if not metric else f"epoch ({metric} never reported)"
    points = with_metric or rows
    ax.plot([r["step"] for r in points], [value(r) for r in points], color="0.75", zorder=1)
    for reason, (marker, color) in MARKERS.items():
        for kept in (True, False):
            chosen = [r for r in points if r["reason"] == reason and (r["status"] == "kept") == kept]
            if chosen:
                ax.scatter([r["step"] for r in chosen], [value(r) for r in chosen], marker=marker, s=70,
                           facecolors=color if kept else "none", edgecolors=color, zorder=3,
                           label=f"{reason or 'unknown'} ({'kept' if kept else 'pruned'})")
    if with_metric:  # checkpoints without the metric (periodic ones, say): marked along the bottom edge
        _without_metric(ax, [r for r in rows if metric not in r["metrics"]], metric)
    _deaths(ax, attempts)
    steps = [r["step"] for r in rows] + [a["last_step"] for a in attempts if a["last_step"] is not None]
    if steps:  # every checkpoint in view, those drawn along the edge too (they do not widen the limits)
        pad = max(1.0, (max(steps) - min(steps)) * 0.03)
        ax.set_xlim(min(steps) - pad, max(steps) + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(shown)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return shown


def _without_metric(ax: Any, rows: list[dict], metric: str) -> None:
    edge = ax.get_xaxis_transform()  # x in steps, y in the axes' fraction
    for reason, (marker, color) in MARKERS.items():
        chosen = [r for r in rows if r["reason"] == reason]
        if chosen:
            ax.scatter([r["step"] for r in chosen], [0.03] * len(chosen), transform=edge, marker=marker, s=50,
                       facecolors=[color if r["status"] == "kept" else "none" for r in chosen], edgecolors=color,
                       zorder=3, label=f"{reason or 'unknown'} (no {metric})")


def _deaths(ax: Any, attempts: list[dict]) -> None:
    labelled: set[str] = set()
    for i, a in enumerate(attempts):
        if a["cause"] in ("finished", "running") or a["last_step"] is None:
            continue
        preempted = a["preempted"] or a["cause"] in ("stopped", "preempted")
        kind = "preemption" if a["preempted"] or a["cause"] == "preempted" else "stop" if preempted else "restart"
        color = {"preemption": "tab:orange", "stop": "0.4", "restart": "tab:red"}[kind]
        ax.axvline(a["last_step"], color=color, linestyle="--" if kind == "restart" else ":", zorder=2,
                   label=None if kind in labelled else f"{kind} (step reached)")
        labelled.add(kind)
        if a["lost_steps"]:
            ax.axvspan(a["last_step"] - a["lost_steps"], a["last_step"], color="tab:red", alpha=0.08, zorder=0,
                       label=None if "lost" in labelled else "work lost (redone)")
            labelled.add("lost")
        ax.annotate(f"#{a['attempt']} {a['cause']}", (a["last_step"], 1), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color=color)


def _timeline_panel(ax: Any, rows: list[dict], attempts: list[dict]) -> None:
    starts = [a["spawned"] for a in attempts] or [0.0]
    origin = min(starts)
    minutes = lambda t: (t - origin) / 60.0  # noqa: E731
    for a in attempts:
        ready = a["spawned"] + a["startup_s"]
        end = a["spawned"] + a["span_s"]
        ax.plot([minutes(a["spawned"]), minutes(ready)], [a["resumed_from"] or 0] * 2, color="0.6", linestyle=":")
        ax.plot([minutes(ready), minutes(end)], [a["resumed_from"] or 0, a["last_step"] or a["resumed_from"] or 0],
                color="tab:blue", linewidth=1.5)
    for reason, (marker, color) in MARKERS.items():
        chosen = [r for r in rows if r["reason"] == reason and r["committed"]]
        if chosen:
            ax.scatter([minutes(_seconds(r["committed"])) for r in chosen], [r["step"] for r in chosen],
                       marker=marker, s=40, facecolors=[color if r["status"] == "kept" else "none" for r in chosen],
                       edgecolors=color, zorder=3)
    ax.set_xlabel("minutes since the first attempt started (dotted: a worker starting)")
    ax.set_ylabel("step reached")
    ax.grid(alpha=0.3)


def _seconds(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
