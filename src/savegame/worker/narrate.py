"""What the worker tells the person running it, Keras-style, on stderr ("savegame: ..." lines):

    savegame: resumed from step 221 (epoch 3, batch 32), best val_acc 0.891
    savegame: epoch 3: val_acc improved from 0.757 to 0.847, saved step 126 (best)
    savegame: warning: monitor='val_acc' was not reported at epoch 1 (reported: loss, val_accuracy); did you mean 'val_accuracy'?

Epochs are counted as the manifest counts them: "epoch 3" is the state after 3 complete epochs (the
line a script prints as "epoch 3/12" at that epoch's end), "epoch 3, batch 32" is 32 batches into
the next one. verbose=0: warnings only; 1 (the default): resumes and improvements;
2: every save and every epoch that did not improve.
"""
from __future__ import annotations

import difflib
import math
from typing import Iterable, Mapping, Optional

from savegame.worker.exits import say

# Names that mean the same across Keras 2, Keras 3 and the tutorials ("acc" vs "accuracy").
_SYNONYMS = {"acc": "accuracy", "accuracy": "acc"}


def fmt(value: Optional[float]) -> str:
    return "none" if value is None or not math.isfinite(value) else f"{value:.4g}"


def position(epoch: int, batch: int) -> str:
    return f"epoch {epoch}" + (f", batch {batch}" if batch else "")


def did_you_mean(name: str, names: Iterable[str]) -> Optional[str]:
    """The reported metric the user most likely meant by `name` (val_acc -> val_accuracy)."""
    names = sorted(set(names))
    for short, long in _SYNONYMS.items():
        if name.endswith(short) and name[: -len(short)] + long in names:
            return name[: -len(short)] + long
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return close[0] if close else None


class Narrator:
    def __init__(self, verbose: int = 1) -> None:
        self.verbose = int(verbose)
        self._warned: set[str] = set()

    def warn_once(self, key: str, line: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            say(f"warning: {line}")

    def unneeded(self, key: str) -> None:
        """A warning the caller knows does not apply (an adapter whose framework checks it itself)."""
        self._warned.add(key)

    def resumed(self, step: int, epoch: int, batch: int, monitor: Optional[str], best: Optional[float]) -> None:
        if self.verbose >= 1:
            tail = f", best {monitor} {fmt(best)}" if monitor else ""
            say(f"resumed from step {step} ({position(epoch, batch)}){tail}")

    def epoch_end(self, epoch: int, monitor: Optional[str], before: Optional[float], after: Optional[float],
                  saved: Optional[tuple[int, str]]) -> None:
        """One line per epoch end: improved (verbose 1), or did not improve / saved (verbose 2)."""
        saving = f", saved step {saved[0]} ({saved[1]})" if saved else ""
        if monitor and after is not None and after != before:
            if self.verbose >= 1:
                start = "" if before is None else f" from {fmt(before)}"
                say(f"epoch {epoch}: {monitor} improved{start} to {fmt(after)}{saving}")
        elif self.verbose >= 2:
            say(f"epoch {epoch}: {monitor} did not improve from {fmt(before)}{saving}" if monitor
                else f"epoch {epoch}{saving or ': not saved'}")

    def saved(self, step: int, reason: str) -> None:
        if self.verbose >= 2:
            say(f"saved step {step} ({reason})")

    def missing_metric(self, monitor: str, epoch: int, reported: Mapping[str, float]) -> None:
        guess = did_you_mean(monitor, reported)
        hint = f"; did you mean {guess!r}?" if guess else ""
        self.warn_once("monitor", f"monitor={monitor!r} was not reported at epoch {epoch} (reported: "
                                  f"{', '.join(sorted(reported)) or 'nothing'}){hint} Until it is, no checkpoint "
                                  "counts as the best, and retention keeps the newest ones only")
