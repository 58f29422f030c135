"""torchrun under savegame: the settings that keep it from fighting the daemon.

- savegame decides restarts (from the latest valid checkpoint, with its budget and backoff); a
  torchrun that restarts its ranks itself would start them again from the checkpoint the daemon
  chose when torchrun started, not the latest one. `--max-restarts` above 0 is refused.
- When torchrun itself is signalled, it gives its ranks `--shutdown-timeout` seconds (30 by default)
  and then SIGKILLs them: that must not cut an emergency checkpoint short, so unless the user chose
  a value, the worker's environment gets one above the grace period; a chosen one below it is warned of.
Only a command that starts torchrun itself (`torchrun ...`, `python -m torch.distributed.run ...`)
is looked at; a wrapper (`sh -c "torchrun ..."`) is not parsed.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional, Sequence

from savegame.errors import ConfigError

log = logging.getLogger("savegame")
SHUTDOWN_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
MODULES = ("torch.distributed.run", "torch.distributed.launch")


def launcher_args(command: Sequence[str]) -> Optional[list[str]]:
    """torchrun's own options (up to the training script), or None when the command is not torchrun."""
    if not command:
        return None
    args = list(command[1:])
    if os.path.basename(command[0]) != "torchrun":
        if len(args) < 2 or args[0] != "-m" or args[1] not in MODULES:
            return None
        args = args[2:]
    own = []
    for arg in args:
        if arg.endswith(".py") or arg == "-m":
            break
        own.append(arg)
    return own


def option(args: Sequence[str], *names: str) -> Optional[str]:
    """The value of `--name V` or `--name=V` (the last one given), or None."""
    value = None
    for i, arg in enumerate(args):
        for name in names:
            if arg == name and i + 1 < len(args):
                value = args[i + 1]
            elif arg.startswith(name + "="):
                value = arg[len(name) + 1:]
    return value


def check_torchrun(command: Sequence[str], env: Mapping[str, str], grace_s: float) -> dict[str, str]:
    """Refuse what fights the daemon; return what to add to the worker's environment."""
    args = launcher_args(command)
    if args is None:
        return {}
    restarts = option(args, "--max-restarts", "--max_restarts") or env.get("PET_MAX_RESTARTS")
    if restarts is not None and restarts.strip() not in ("0", ""):
        raise ConfigError(f"torchrun --max-restarts {restarts}: torchrun would restart the ranks itself, from the "
                          "checkpoint chosen when it started; give --max-restarts 0 (savegame restarts the whole job "
                          "from the latest valid checkpoint, with its budget and backoff)")
    chosen = option(args, "--shutdown-timeout", "--shutdown_timeout") or env.get("PET_SHUTDOWN_TIMEOUT") \
        or env.get(SHUTDOWN_ENV)
    wanted = math.ceil(grace_s) + 10
    if chosen is None:
        return {SHUTDOWN_ENV: str(wanted)}
    try:
        short = float(chosen) < grace_s
    except ValueError:
        return {}
    if short:
        log.warning("torchrun's shutdown timeout (%ss) is shorter than the grace period (%gs): if torchrun itself is "
                    "signalled, it SIGKILLs the ranks before their emergency checkpoint is committed; give "
                    "--shutdown-timeout %d", chosen, grace_s, wanted)
    return {}
