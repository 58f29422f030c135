"""Where training stands (epoch, step, batch within the epoch) and the framework-free RNG states."""
from __future__ import annotations

import random
import sys
from dataclasses import asdict, dataclass
from typing import Any, Mapping


@dataclass
class Progress:
    epoch: int = 0  # completed epochs
    step: int = 0  # completed optimizer steps, over the whole run
    batch_in_epoch: int = 0  # completed steps in the current epoch

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Progress":
        return cls(epoch=int(data["epoch"]), step=int(data["step"]), batch_in_epoch=int(data["batch_in_epoch"]))


def rng_state() -> dict[str, Any]:
    """Python's and (if loaded) NumPy's global RNG states, as JSON."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {"python": [version, list(internal), gauss]}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        name, keys, pos, has_gauss, cached = numpy.random.get_state()
        state["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy

        name, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((name, numpy.array(keys, dtype=numpy.uint32), pos, has_gauss, cached))
