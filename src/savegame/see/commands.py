"""The commands that show a run: `savegame report | history | plot` (cli.py wires them in).

cli.py hands over its helpers (the store and the run's stored policy, what a running daemon protects,
strict JSON output), so this module does not import it back.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from savegame.errors import ConfigError

PLOT_FORMATS = (".png", ".svg", ".pdf")


def add_parsers(sub: Any, policy_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    report = sub.add_parser("report", help="where a run's time went (goodput), attempt by attempt")
    report.add_argument("dir", metavar="DIR")
    report.add_argument("--json", action="store_true")

    history = sub.add_parser("history", help="every checkpoint the run committed: kept or pruned, and why")
    history.add_argument("url", metavar="DIR_OR_URL")
    policy_flags(history)
    shape = history.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="one object per checkpoint, oldest first")
    shape.add_argument("--csv", action="store_true", help="one line per checkpoint, a column per metric")

    plot = sub.add_parser("plot", help="the monitored metric vs step, checkpoints, restarts (savegame[plot])")
    plot.add_argument("dir", metavar="DIR")
    plot.add_argument("--out", required=True, metavar="FILE", help="a .png, .svg or .pdf file")
    plot.add_argument("--metric", metavar="NAME", help="the metric to plot (default: the run's monitored one)")


def commands(open_with_policy: Callable[[argparse.Namespace], tuple[Any, Any]],
             protected: Callable[[str], dict[int, str]], print_json: Callable[[Any], None]) -> dict[str, Callable]:
    def cmd_report(args: argparse.Namespace) -> int:
        from savegame.see.report import format_report, report

        data = report(_run_folder(args.dir))
        print_json(data) if args.json else print(format_report(data))
        return 0

    def cmd_history(args: argparse.Namespace) -> int:
        from savegame.see.rows import csv_rows, format_rows, history_rows

        store, config = open_with_policy(args)
        rows, record = history_rows(store, config, protected(args.url))
        if record.skipped:  # on stderr: --json and --csv stay parseable
            print(f"savegame: {record.skipped} lines of the run's history could not be read and were left out",
                  file=sys.stderr)
        if args.json:
            print_json(rows)
        else:
            print(csv_rows(rows) if args.csv else format_rows(rows), end="" if args.csv else "\n")
        return 0

    def cmd_plot(args: argparse.Namespace) -> int:
        from savegame.see.plot import plot_run

        if not args.out.lower().endswith(PLOT_FORMATS):
            raise ConfigError(f"--out {args.out}: must end in {', '.join(PLOT_FORMATS)}")
        store, config = open_with_policy(argparse.Namespace(**{**vars(args), "url": args.dir}))
        _run_folder(args.dir)
        metric = args.metric or (config.monitor[0] if config.monitor else None)
        print(plot_run(store, config, metric, args.out))
        return 0

    return {"report": cmd_report, "history": cmd_history, "plot": cmd_plot}


def _run_folder(path: str) -> Any:
    from savegame.inspect_cmds import open_existing

    if "://" in path:
        raise ConfigError(f"{path}: give the run folder (its attempts are recorded on the machine that ran it); "
                          "`savegame history URL` reads a bucket")
    store = open_existing(path)
    if not os.path.isdir(os.path.join(store.location.path, ".savegame")):
        raise ConfigError(f"{path} is not a run folder (no .savegame/ in it); give the --dir of a `savegame run`")
    return store
