"""`savegame run | ls | verify | prune | restore | export | status | report | history | plot`. Logging is configured here, and only here.

Exit codes: 0 ok, 1 a run gave up or verify found damage, 2 usage, 74 checkpoints did not reach where
they must (the mirror, a full disk), 78 bad configuration.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from typing import Any, Optional, Sequence

from savegame import protocol
from savegame.config import Layer, RunConfig, build_config, read_toml
from savegame.errors import ConfigError, SavegameError, StorageError
from savegame.journal import JournalFormatter, journal_stream, prefixed
from savegame.see import commands as see_commands

log = logging.getLogger("savegame")


def _to_journal() -> bool:
    try:
        return journal_stream(os.environ, sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):  # no stderr, or not a real file
        return False


def _error_line(message: str) -> None:
    """An error said outside logging (usage, configuration): priority 3 in the journal too."""
    print(prefixed(message, 3) if _to_journal() else message, file=sys.stderr)


def _set_up_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # journald stamps the time itself and files each line under the priority it starts with
    handler.setFormatter(JournalFormatter() if _to_journal()
                         else logging.Formatter("%(asctime)s savegame %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("botocore", "aiobotocore", "s3fs", "fsspec", "urllib3", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--shared` must not quietly mean --shared-memory, and a flag added later
        # must not change what a unit file's or a job script's abbreviation meant.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        _error_line(f"savegame: error: {message}")
        raise SystemExit(protocol.EXIT_USAGE)


def _policy_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--regime", choices=("short", "normal", "long"), help="retention preset (default: normal)")
    p.add_argument("--monitor", help="metric that decides the best checkpoint, e.g. val_acc")
    p.add_argument("--mode", choices=("min", "max", "auto"), help="whether a larger or smaller metric is better")
    p.add_argument("--keep-last", type=int, metavar="N")
    p.add_argument("--keep-best", type=int, metavar="K")
    p.add_argument("--keep-every", type=int, metavar="N", help="also keep the first checkpoint of every N steps")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="savegame", description="Keeps long training runs alive.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a training command under supervision")
    _policy_flags(run)
    run.add_argument("--dir", help="local run root (default: ./checkpoints)")
    run.add_argument("--mirror", metavar="URL", help="object storage to mirror checkpoints to, e.g. s3://bucket/run")
    run.add_argument("--resume", choices=("latest", "best", "none"))
    run.add_argument("--grace", type=float, metavar="SECONDS", help="time the worker gets to save on stop (25)")
    run.add_argument("--max-restarts", type=int, metavar="N", help="failures allowed per restart window (5)")
    run.add_argument("--hang-timeout", metavar="SECONDS|auto",
                     help="restart a worker silent this long (auto: max(hang_floor, 20 x its slowest step)); 0: off")
    run.add_argument("--metrics", metavar="HOST:PORT", help="serve Prometheus metrics there (off by default)")
    run.add_argument("--metrics-textfile", metavar="FILE.prom", help="write them for node_exporter's textfile collector")
    run.add_argument("--shared-memory", action=argparse.BooleanOptionalAction, default=None,
                     help="hand saves over to the daemon through /dev/shm: a worker killed right after a save "
                          "still gets it committed, a restart reads it from RAM (costs two more state-sized "
                          "copies in RAM); --no-shared-memory overrides a config file's shared_memory = true")
    run.add_argument("--nodes", type=int, metavar="N", help="the job spans N nodes, one daemon each, on a shared --dir")
    run.add_argument("--node", metavar="NAME", help="with --nodes: this node's name (default: the host name)")
    run.add_argument("--leader", action="store_true", default=None,
                     help="with --nodes: this node runs retention and the mirror (default: the node of rank 0)")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    ls = sub.add_parser("ls", help="list committed checkpoints")
    ls.add_argument("url", metavar="DIR_OR_URL")
    _policy_flags(ls)
    ls.add_argument("--json", action="store_true", help="committed checkpoints as JSON, oldest first")
    ls.add_argument("--all", action="store_true",
                    help="with --json, also damaged, incomplete and quarantined folders (marked by 'status')")

    verify = sub.add_parser("verify", help="check every file's size and checksum")
    verify.add_argument("url", metavar="DIR_OR_URL")
    verify.add_argument("--step", type=int)
    verify.add_argument("--json", action="store_true")

    prune = sub.add_parser("prune", help="delete what the retention policy does not keep")
    prune.add_argument("url", metavar="DIR_OR_URL")
    _policy_flags(prune)
    prune.add_argument("--dry-run", action="store_true")
    prune.add_argument("--json", action="store_true")

    restore = sub.add_parser("restore", help="copy one checkpoint (verified) into a local folder")
    restore.add_argument("url", metavar="DIR_OR_URL")
    which = restore.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true")
    which.add_argument("--best", action="store_true")
    which.add_argument("--step", type=int)
    restore.add_argument("--monitor")
    restore.add_argument("--mode", choices=("min", "max", "auto"))
    restore.add_argument("--to", required=True, metavar="DIR")

    export = sub.add_parser("export", help="write one checkpoint's model in its framework's own format")
    export.add_argument("url", metavar="DIR_OR_URL")
    which = export.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true")
    which.add_argument("--best", action="store_true", help="best by the run's monitored metric")
    which.add_argument("--step", type=int)
    export.add_argument("--monitor")
    export.add_argument("--mode", choices=("min", "max", "auto"))
    export.add_argument("--object", metavar="NAME", help="which tracked model (torch: default 'model')")
    export.add_argument("--to", required=True, metavar="FILE",
                        help="torch: FILE.safetensors; Keras: FILE.keras or FILE.weights.h5; TensorFlow: a prefix")

    status = sub.add_parser("status", help="show what the daemon of a run folder is doing")
    status.add_argument("dir", metavar="DIR")
    status.add_argument("--json", action="store_true")
    status.add_argument("--all", action="store_true",
                        help="every run folder one level below DIR, one line each; exit 1 if any failed or is stale")
    status.add_argument("--stale-after", type=_positive_seconds, default=120.0, metavar="SECONDS",
                        help="with --all: a running daemon whose status is older than this is stale (120)")
    see_commands.add_parsers(sub, _policy_flags)  # report, history, plot
    return parser


def config_from_args(args: argparse.Namespace, stored: Optional[Layer] = None) -> RunConfig:
    """The run's stored policy (lowest), the config file, the command-line flags: one validation."""
    layers = [stored] if stored is not None else []
    if getattr(args, "config", None):
        layers.append(read_toml(args.config))
    flags: dict[str, Any] = {}
    for flag, key in (("dir", "dir"), ("mirror", "mirror"), ("regime", "regime"), ("resume", "resume"),
                      ("monitor", "monitor"), ("mode", "mode"), ("grace", "grace"),
                      ("max_restarts", "max_restarts"), ("hang_timeout", "hang_timeout"), ("metrics", "metrics"),
                      ("metrics_textfile", "metrics_textfile"), ("nodes", "nodes"), ("node", "node"),
                      ("leader", "leader"), ("shared_memory", "shared_memory")):
        value = getattr(args, flag, None)
        if value is not None:
            flags[key] = value
    keep = {key: getattr(args, flag) for flag, key in (("keep_last", "last"), ("keep_best", "best"),
                                                        ("keep_every", "every")) if getattr(args, flag, None) is not None}
    if keep:
        flags["keep"] = keep
    if getattr(args, "cmd", None):
        cmd = args.cmd[1:] if args.cmd[0] == "--" else args.cmd
        if cmd:
            flags["command"] = cmd
    layers.append(Layer("command line", flags))
    return build_config(layers)


def _open_with_policy(args: argparse.Namespace) -> tuple[Any, RunConfig]:
    """The store of DIR_OR_URL and the settings to judge it by: its run's stored policy, under the
    config file and the flags (so `ls`, `prune` and `restore --best` keep and pick what the run does)."""
    from savegame.inspect_cmds import open_existing
    from savegame.policy import read_policy

    given = config_from_args(args)
    store = open_existing(args.url, given["storage"])
    stored = read_policy(store)
    return store, (config_from_args(args, stored) if stored is not None else given)


def _print_json(data: Any) -> None:
    """Strict JSON only: NaN and infinities (not JSON, and refused by most parsers) become null."""
    json.dump(_finite_or_null(data), sys.stdout, indent=1, default=str, allow_nan=False)
    sys.stdout.write("\n")


def _finite_or_null(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_null(value) for value in data]
    return data


def _protected_by_daemon(url: str) -> dict[int, str]:
    """What a running daemon keeps for now (its resume source, what the mirror has not confirmed)
    must survive a prune from the command line too."""
    from savegame.daemon.status import read_node_statuses, read_status

    statuses = [read_status(url) or {}, *(read_node_statuses(url).values())] if "://" not in url else []
    protected: dict[int, str] = {}
    for status in statuses:  # one daemon, or one per node of a job
        for step, why in _protected_by_one(status or {}).items():
            protected.setdefault(step, why)
    return protected


def _protected_by_one(status: dict) -> dict[int, str]:
    from savegame.daemon.status import TERMINAL_STATES

    if status.get("state") in TERMINAL_STATES:
        return {}
    listed = status.get("protected")
    protected = {int(step): f"{why} (running daemon)" for step, why in (listed.items() if isinstance(listed, dict) else ())
                 if isinstance(step, str) and step.isdigit() and len(step) <= 12}
    resumed = status.get("resumed_from")
    if isinstance(resumed, int) and not isinstance(resumed, bool) and resumed >= 0:
        protected.setdefault(resumed, "resume source of the running daemon")
    return protected


def cmd_ls(args: argparse.Namespace) -> int:
    from savegame.inspect_cmds import format_ls, ls_rows

    store, config = _open_with_policy(args)
    rows = ls_rows(store, config, _protected_by_daemon(args.url), include_problems=args.all or not args.json)
    _print_json(rows) if args.json else print(format_ls(rows))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from savegame.inspect_cmds import open_existing, verify_rows

    store = open_existing(args.url)
    rows = verify_rows(store, args.step)
    if args.json:
        _print_json(rows)
    else:
        for row in rows:
            print(f"step {row['step']}: " + ("ok" if row["ok"] else "DAMAGED: " + "; ".join(row["problems"])))
        if not rows:
            print("no checkpoints")
        unfinished = [p.name for p in store.scan().incomplete] if args.step is None else []
        if unfinished:  # not checkpoints, not damage: a save or delete in progress, or its leftover
            print(f"{len(unfinished)} folder(s) without a manifest (unfinished saves or deletes, collected when "
                  f"stale): {', '.join(unfinished[:5])}{' ...' if len(unfinished) > 5 else ''}")
    return 0 if all(r["ok"] for r in rows) else protocol.EXIT_FAILED


def cmd_prune(args: argparse.Namespace) -> int:
    from savegame.inspect_cmds import prune

    store, config = _open_with_policy(args)
    result = prune(store, config, _protected_by_daemon(args.url), args.dry_run)
    if args.json:
        _print_json(result)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        for item in result["keep"]:
            print(f"keep   step {item['step']}: {', '.join(item['why'])}")
        for item in result["delete"]:
            print(f"{verb} step {item['step']}")
        for path in result["collect"]:
            print(f"{'would remove' if args.dry_run else 'removed'} stale staging {path}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from savegame.inspect_cmds import choose, restore

    store, config = _open_with_policy(args)
    which = "latest" if args.latest else "best" if args.best else "step"
    info = restore(store, choose(store, which, args.step, config), args.to)
    print(f"restored step {info.step} to {info.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from savegame.export import export
    from savegame.inspect_cmds import choose

    store, config = _open_with_policy(args)
    which = "latest" if args.latest else "best" if args.best else "step"
    info = choose(store, which, args.step, config)
    what = export(store, info, args.to, args.object)
    print(f"exported step {info.step} (epoch {info.epoch}, {info.reason}) to {args.to}: {what}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from savegame.daemon.supervisor import run_supervised

    config = config_from_args(args)
    if not config["command"]:
        _error_line("savegame: error: no command to run: savegame run [options] -- python train.py ...")
        return protocol.EXIT_USAGE
    try:
        return run_supervised(config)
    except StorageError as exc:  # the run folder's disk is full, the mirror cannot be read: retry later
        _error_line(f"savegame: {exc.strerror or exc}")
        return protocol.EXIT_IO


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 86400 * 366:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds > 0")
    return value


def cmd_status_all(args: argparse.Namespace) -> int:
    from savegame.daemon.overview import format_overview, overview

    rows = overview(args.dir, args.stale_after)
    if args.json:
        _print_json(rows)
    else:
        print(format_overview(rows) if rows else f"no runs under {args.dir}")
    return protocol.EXIT_FAILED if any(row["problem"] for row in rows) else protocol.EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from savegame.daemon.status import format_status, read_node_statuses, read_status, status_path

    if args.all:
        return cmd_status_all(args)

    status = read_status(args.dir)
    nodes = read_node_statuses(args.dir) if status is None else {}
    if nodes:  # a job on several nodes: one daemon, and one status, per node
        if args.json:
            _print_json(nodes)
        else:
            print("\n\n".join(f"node {node}:\n" + (format_status(s) if s else "  (status file damaged)")
                              for node, s in nodes.items()))
        return 0
    if status is None:
        if os.path.lexists(status_path(args.dir)):
            raise ConfigError(f"{status_path(args.dir)} is damaged (not a status file savegame wrote); a running "
                              "daemon rewrites it every second")
        raise ConfigError(f"{args.dir} has no daemon status; is it the --dir of a `savegame run`?")
    _print_json(status) if args.json else print(format_status(status))
    return 0


COMMANDS = {"run": cmd_run, "ls": cmd_ls, "verify": cmd_verify, "prune": cmd_prune,
            "restore": cmd_restore, "export": cmd_export, "status": cmd_status,
            **see_commands.commands(_open_with_policy, _protected_by_daemon, _print_json)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _set_up_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _error_line(f"savegame: configuration error: {exc}")
        return protocol.EXIT_CONFIG
    except StorageError as exc:
        _error_line(f"savegame: {exc.strerror or exc}")
        return protocol.EXIT_FAILED
    except SavegameError as exc:
        _error_line(f"savegame: {exc}")
        return protocol.EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `savegame ls | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
