"""The tutorial's three training regimes as named presets of save and keep settings.

A preset only fills in what the user left unset; every value can be overridden.
"""
from __future__ import annotations

from typing import Any

REGIMES: dict[str, dict[str, dict[str, Any]]] = {
    # minutes to hours: save every epoch, keep the latest and the best
    "short": {
        "save": {"every_epochs": 1, "every_steps": 0, "every_seconds": 0, "on_improvement": True},
        "keep": {"last": 1, "best": 1, "every": 0, "thin": []},
    },
    # hours to a day: save every n epochs, keep the best and the last 10
    "normal": {
        "save": {"every_epochs": 1, "every_steps": 0, "every_seconds": 0, "on_improvement": True},
        "keep": {"last": 10, "best": 1, "every": 0, "thin": []},
    },
    # days to weeks: save every n steps or minutes; keep a few last and best, and a thinning tail
    "long": {
        "save": {"every_epochs": 0, "every_steps": 1000, "every_seconds": 1800, "on_improvement": True},
        "keep": {"last": 3, "best": 3, "every": 0,
                 "thin": [{"younger_than": "1d", "every": "1h"}, {"younger_than": "forever", "every": "1d"}]},
    },
}
DEFAULT_REGIME = "normal"
