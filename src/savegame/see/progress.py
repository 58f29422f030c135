"""Progress bars for the long commands (`restore`, `verify`): on a terminal only, never in a log.

tqdm draws them (the optional extra savegame[progress]); without it, or when stderr is not a
terminal (a pipe, a file, journald), nothing is drawn and nothing is imported.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

Advance = Callable[[int], None]


def _quiet(_n: int) -> None:
    pass


@contextlib.contextmanager
def bar(total: int, desc: str, unit: str = "B") -> Iterator[Advance]:
    """A function to call with each amount done; the bar goes when the block ends."""
    if not sys.stderr.isatty():
        yield _quiet
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield _quiet
        return
    scaled = unit == "B"  # bytes as KB, MB; counts as they are
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, unit_divisor=1024 if scaled else 1000,
              file=sys.stderr, leave=False, dynamic_ncols=True) as shown:
        yield shown.update
