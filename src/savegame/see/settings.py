"""The settings of seeing a run (merged into config.py's schema): where the metrics go."""
from __future__ import annotations

import re
from typing import Any, Callable

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


def metrics_address(value: Any) -> str:
    """HOST:PORT to serve /metrics on ([v6]:PORT; 0.0.0.0 for every interface; port 0: any free one,
    told in the log and in status.json's `metrics_url`)."""
    match = _ADDRESS.match(value) if isinstance(value, str) else None
    if not match or not 0 <= int(match.group(2)) < 65536:
        raise ValueError('must be "HOST:PORT", like "127.0.0.1:9464" (0.0.0.0 for every interface, '
                         '[::1]:9464 for IPv6, port 0 for any free one)')
    return value


def metrics_textfile(value: Any) -> str:
    """A .prom file for node_exporter's textfile collector; {run} is the run folder's name."""
    if not isinstance(value, str) or not value.endswith(".prom") or value.endswith("/.prom"):
        raise ValueError('must be a path ending in ".prom" (node_exporter reads only those), like '
                         '"/var/lib/node_exporter/savegame_{run}.prom"')
    return value


KEYS: dict[str, Callable[[Any], Any]] = {"metrics": metrics_address, "metrics_textfile": metrics_textfile}
