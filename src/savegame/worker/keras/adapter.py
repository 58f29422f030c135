"""Keras 3 adapter (tensorflow, torch and jax backends): exact save and resume of a Keras model.

What a checkpoint holds:
- `model.keras` (or `model.weights.h5` with save_weights_only): the model and its optimizer, laid
  out as Keras' own `model.save`/`save_weights` lay them out, so `keras.models.load_model` and
  `model.load_weights` read it (see keras_format);
- `state.safetensors`: what Keras files leave out: the seed generators' states (dropout draws),
  the interrupted epoch's running train metrics, the global seed generator, torch's generator;
- `state.json`: progress (epoch, step, batch in the epoch), the best monitored value, Python and
  NumPy RNG states.

Saving copies every variable into reusable host buffers on the training thread (one memcpy each);
the files are written from those copies on the writer thread. Nothing is ever unpickled. The
ModelCheckpoint-like callback is in keras_callback, the loaders for Keras' tools in keras_load.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any, Callable, Iterable, Iterator, Optional

import keras
import numpy as np

from savegame.errors import ConfigError, CorruptCheckpoint, UnsupportedFormat
from savegame.worker.adapter import Capture, CheckpointReader
from savegame.worker.keras.format import (KERAS_FILE, WEIGHTS_FILE, HostBuffers, build_optimizer, host_array,
                                          numpy_dtype, read_weights, record_layout, serialized_config,
                                          with_optimizer_variables, write_keras_file, write_weights_h5)
from savegame.worker.safetensors_io import TensorBlob, TensorInfo

log = logging.getLogger("savegame.worker")
_NUMPY_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "U32": "uint32",
                 "U64": "uint64", "BOOL": "bool"}
_SAFETENSORS_DTYPES = {v: k for k, v in _NUMPY_DTYPES.items()}


# -- the adapter ----------------------------------------------------------------------------------

class KerasAdapter:
    framework = "keras"

    def __init__(self) -> None:
        self.model: Any = None
        self.save_weights_only = False
        self.pending_metrics: list[tuple[Any, np.ndarray]] = []  # applied after Keras resets metrics
        self.torch_rng: Optional[np.ndarray] = None  # the restored torch generator state
        self.live_state_damaged = False  # a failed restore left partly-read data in the model
        self._buffers = HostBuffers()
        self._layout_cache: Optional[tuple[tuple, list]] = None

    def add(self, **objects: Any) -> None:
        for name, obj in objects.items():
            if isinstance(obj, ResumableBatches):
                continue  # its position is the Checkpointer's progress
            if isinstance(obj, keras.Model):
                if self.model is not None and self.model is not obj:
                    raise ConfigError("track(): one Keras model per Checkpointer")
                self.model = obj
            elif isinstance(obj, keras.optimizers.Optimizer):
                if self.model is None or obj is not self.model.optimizer:
                    raise ConfigError(f"track(): {name} must be the tracked model's optimizer (model.compile(optimizer=...))")
            else:
                raise ConfigError(f"track(): {name}={type(obj).__name__} is not a Keras model or its optimizer")

    # -- saving ---------------------------------------------------------------------------------

    def _extras(self) -> list[tuple[str, Any]]:
        """Variables the Keras file leaves out: seed generator states, train metrics, the global seed."""
        model = self.model
        extras = [("variable", v) for v in model.variables]
        extras += [("metric", v) for v in model.metrics_variables]
        seed = global_seed_generator(create=False)
        if seed is not None:
            extras.append(("global_seed", seed.state))
        if keras.backend.backend() == "torch":  # unseeded dropout draws from torch's global generator
            import torch
            extras.append(("torch_rng", torch.get_rng_state()))
        return extras

    def _layout(self) -> list:
        """The file layout, recorded once per set of variables (again whenever it changes)."""
        model = self.model
        optimizer = getattr(model, "optimizer", None)
        key = tuple(map(id, model.variables)) + tuple(map(id, optimizer.variables if optimizer else ()))
        if self._layout_cache is not None and self._layout_cache[0] == key:
            return self._layout_cache[1]
        layout = with_optimizer_variables(record_layout(model), model)
        if all(isinstance(value, keras.Variable) for _p, _m, items in layout for _k, value in items):
            self._layout_cache = (key, layout)  # computed values (a merged LoRA kernel) are recorded every time
        return layout

    def capture(self) -> Capture:
        model = self._require_model()
        build_optimizer(model)
        layout = self._layout()
        in_file = {id(value) for _p, _m, items in layout for _k, value in items}
        extras = [(kind, v) for kind, v in self._extras() if id(v) not in in_file]
        variables = [value for _p, _m, items in layout for _k, value in items] + [v for _k, v in extras]
        copies = self._buffers.copy([_as_array(v) for v in variables])
        file_values = iter(copies)
        entries = [(p, m, [(k, next(file_values)) for k, _v in items]) for p, m, items in layout]
        extra_copies = copies[len(copies) - len(extras):] if extras else []
        blobs = [TensorBlob(f"extra.{i}", _SAFETENSORS_DTYPES[_dtype_name(a)], tuple(a.shape),
                            memoryview(a.reshape(-1).view(np.uint8))) for i, a in enumerate(extra_copies)]
        described = [{"kind": kind, "path": getattr(v, "path", kind), "shape": list(a.shape)}
                     for (kind, v), a in zip(extras, extra_copies)]
        config = None if self.save_weights_only else serialized_config(model)
        name = WEIGHTS_FILE if config is None else KERAS_FILE
        state = {"file": name, "backend": keras.backend.backend(), "extras": described,
                 "layout": _layout_keys(layout)}
        # The file holds every copy plus HDF5's structure (a page of alignment at most per dataset, groups,
        # attributes, the model's config): an estimate on the large side, for the hand-over's segment.
        estimate = sum(a.nbytes + 4096 for a in copies) + (1 << 20) + sum(map(len, config or ()))
        return Capture(blobs=blobs, state=state, files={name: _file_writer(entries, config)},
                       file_bytes={name: estimate})

    def _require_model(self) -> Any:
        if self.model is None:
            raise ConfigError("nothing to save: track(model=...) a Keras model")
        if not self.model.built:
            raise ConfigError("the Keras model is not built yet: build it (or call it on a batch) before saving")
        return self.model

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, reader: CheckpointReader) -> None:
        model = self._require_model()
        state = reader.state.get("adapter", {})
        name = state.get("file")
        if name not in (WEIGHTS_FILE, KERAS_FILE) or not reader.has(name):
            raise CorruptCheckpoint(f"{reader.info.path}: holds no Keras model file ({WEIGHTS_FILE} or {KERAS_FILE})")
        build_optimizer(model)
        layout = self._layout()
        _check_layout(state, layout, reader)
        in_file = {id(value) for _p, _m, items in layout for _k, value in items}
        extras = [(kind, v) for kind, v in self._extras() if id(v) not in in_file and kind in ("variable", "metric")]
        plan = _match_extras(state.get("extras", []), extras, reader)
        path = reader.verified_local_path(name)
        values = read_weights(path, layout, reader.info.path)
        arrays = self._read_extras(reader, plan)
        missing = [f"extra.{i}" for i, _kind, _t in plan if f"extra.{i}" not in arrays]
        if missing:
            raise CorruptCheckpoint(f"{reader.info.path}: tensors {missing[:3]} are missing")
        self.live_state_damaged = True  # until this restore has completed
        try:
            if values is None:
                model.load_weights(path)  # a layout only Keras' own loader knows (e.g. LoRA kernels)
            for variable, value in values or ():
                variable.assign(value)
        except (ValueError, KeyError, OSError) as exc:
            raise ConfigError(f"{reader.info.path}: cannot load {name} into this model: {exc}") from None
        self.pending_metrics = []
        for i, kind, target in plan:
            if kind == "metric":
                self.pending_metrics.append((target, arrays[f"extra.{i}"]))
            elif kind == "global_seed":
                global_seed_generator(create=True).state.assign(arrays[f"extra.{i}"])
            elif kind == "torch_rng":
                self.torch_rng = arrays[f"extra.{i}"]
                set_torch_rng(self.torch_rng)
            else:
                target.assign(arrays[f"extra.{i}"])
        self.live_state_damaged = False

    def _read_extras(self, reader: CheckpointReader, plan: list[tuple[int, str, Any]]) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        targets = {f"extra.{i}": (kind, target) for i, kind, target in plan}

        def allocate(info: TensorInfo) -> memoryview:
            array = np.empty(info.shape, dtype=numpy_dtype(_NUMPY_DTYPES[info.dtype]))
            arrays[info.name] = array
            return memoryview(array.reshape(-1).view(np.uint8))

        reader.read_tensors(allocate, lambda infos: _check_extras(infos, targets, reader.info.path))
        return arrays

    def apply_pending_metrics(self) -> None:
        """Put back the interrupted epoch's running train metrics (Keras resets them at each epoch's start)."""
        for variable, array in self.pending_metrics:
            variable.assign(array)
        self.pending_metrics = []

    # -- data position (for custom loops over a ResumableBatches) ------------------------------

    def prepare_loader(self, loader: Iterable[Any], epoch: int, skip_batches: int,
                       mid_epoch: bool) -> tuple[Iterator[Any], int]:
        if isinstance(loader, ResumableBatches):
            loader.set_position(epoch, skip_batches)
            return (loader[i] for i in range(loader.num_batches)), skip_batches
        return iter(loader), 0


def _match_extras(saved: list[dict[str, Any]], live: list[tuple[str, Any]],
                  reader: CheckpointReader) -> list[tuple[int, str, Any]]:
    """Pair saved extras with this model's, by position within each kind (seed generator names
    depend on what else the process built); [(index in the file, kind, live variable)]."""
    plan: list[tuple[int, str, Any]] = []
    for kind in ("variable", "metric"):
        mine = [(i, e) for i, e in enumerate(saved) if e.get("kind") == kind]
        theirs = [v for k, v in live if k == kind]
        shapes_match = len(mine) == len(theirs) and all(
            list(e["shape"]) == list(v.shape) for (_i, e), v in zip(mine, theirs))
        if not shapes_match and kind == "variable":
            raise ConfigError(f"{reader.info.path}: the seed generators differ from this model's "
                              f"(saved {[e['path'] for _i, e in mine][:4]}, here {[v.path for v in theirs][:4]})")
        if not shapes_match:
            log.info("not restoring the interrupted epoch's train metrics: they are not built yet")
            continue
        plan += [(i, kind, v) for (i, _e), v in zip(mine, theirs)]
    plan += [(i, e["kind"], None) for i, e in enumerate(saved) if e.get("kind") == "global_seed"
             or (e.get("kind") == "torch_rng" and keras.backend.backend() == "torch")]
    return plan


def _check_extras(infos: list[TensorInfo], targets: dict[str, tuple[str, Any]], where: str) -> None:
    """Before any byte is read: each extra fits the variable it goes into (dtype and shape), and the
    torch generator state is a byte vector."""
    for info in infos:
        if info.dtype not in _NUMPY_DTYPES:
            raise UnsupportedFormat(f"{where}: tensor {info.name} has dtype {info.dtype}, which Keras does not hold")
        kind, target = targets.get(info.name, ("", None))
        if target is not None and (tuple(target.shape) != info.shape
                                   or _SAFETENSORS_DTYPES.get(str(target.dtype)) != info.dtype):
            raise ConfigError(f"{where}: tensor {info.name} ({getattr(target, 'path', kind)}) is "
                              f"{info.dtype}{list(info.shape)}, the model's is {target.dtype}{list(target.shape)}: "
                              "the checkpoint does not fit this model")
        if kind == "torch_rng" and (info.dtype != "U8" or len(info.shape) != 1):
            raise CorruptCheckpoint(f"{where}: tensor {info.name} is {info.dtype}{list(info.shape)}, "
                                    "not a random generator state (U8[n])")


def _layout_keys(layout: list) -> list:
    return [[p, [k for k, _v in items]] for p, _m, items in layout]


def _check_layout(state: dict[str, Any], layout: list, reader: CheckpointReader) -> None:
    """Refuse a checkpoint of another model (or optimizer) before anything is loaded."""
    saved, current = state.get("layout"), _layout_keys(layout)
    if saved is not None and saved != current:
        differ = {p for p, k in current if [p, k] not in saved} | {p for p, k in saved if [p, k] not in current}
        raise ConfigError(f"{reader.info.path}: saved by a different model or optimizer (differs at "
                          f"{sorted(differ)[:5]})")


def _as_array(variable: Any) -> np.ndarray:
    if hasattr(variable, "path") or hasattr(variable, "value"):
        return host_array(variable)
    return np.asarray(keras.ops.convert_to_numpy(variable))  # a computed value (e.g. a LoRA-merged kernel)


def _dtype_name(array: np.ndarray) -> str:
    return "bfloat16" if array.dtype == numpy_dtype("bfloat16") else array.dtype.name


def set_torch_rng(state: np.ndarray) -> None:
    import torch
    torch.set_rng_state(torch.from_numpy(state.copy()))


def global_seed_generator(create: bool) -> Any:
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    if create:
        return seed_generator.global_seed_generator()
    return global_state.get_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR)


def _file_writer(entries: list, config: Optional[tuple[str, str]]) -> Callable[[Any], None]:
    """Writes the Keras file on the writer thread, from the captured copies."""
    def write(sink: Any) -> None:
        if config is None:
            write_weights_h5(sink, entries)
        else:
            write_keras_file(sink, config[0], config[1], entries)
    return write


# -- data: batches in a seeded order that can start mid-epoch ------------------------------------

class ResumableBatches(keras.utils.PyDataset):
    """Shuffled batches whose order is a function of (seed, epoch) alone, and that can start mid-epoch.

    Pass it to `fit` (with shuffle=False: it shuffles by itself) and to SavegameCallback(data=...):
    a resumed run then trains exactly the batches an uninterrupted run would have trained next.
    """

    def __init__(self, x: Any, y: Any = None, batch_size: int = 32, *, shuffle: bool = True, seed: int = 0,
                 sample_weight: Any = None, batches_per_epoch: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.x, self.y, self.sample_weight = x, y, sample_weight
        self.size = len(x)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        full = -(-self.size // self.batch_size)
        self.batches_per_epoch = min(full, batches_per_epoch) if batches_per_epoch else full
        self.epoch = 0
        self.start = 0
        self._order: tuple[int, np.ndarray] = (-1, np.arange(0))

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self, epoch: int) -> np.ndarray:
        cached_epoch, order = self._order
        if cached_epoch != epoch:
            order = (np.random.default_rng([self.seed, epoch]).permutation(self.size) if self.shuffle
                     else np.arange(self.size))
            self._order = (epoch, order)
        return order

    def batch_indices(self, epoch: int, index: int) -> np.ndarray:
        """The sample indices of batch `index` of `epoch`."""
        return self.order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]

    @property
    def num_batches(self) -> int:
        return self.batches_per_epoch - self.start

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, i: int) -> tuple:
        if not 0 <= i < self.num_batches:
            raise IndexError(f"batch {i} of {self.num_batches}")
        idx = self.batch_indices(self.epoch, self.start + i)
        batch = (self.x[idx],) if self.y is None else (self.x[idx], self.y[idx])
        return batch + ((self.sample_weight[idx],) if self.sample_weight is not None else ())

    def on_epoch_begin(self) -> None:
        _keep_batch_order()


def _keep_batch_order() -> None:
    """fit(shuffle=True) would make Keras request a ResumableBatches' batches in a random order,
    which no resume could reproduce; it shuffles samples itself, so that request is turned off.
    Keras 3's PyDatasetAdapter calls this hook right before it makes the epoch's iterator."""
    import inspect

    frame, adapter = inspect.currentframe(), None
    for _ in range(8):  # up to the adapter, past any subclass' on_epoch_begin
        frame = frame.f_back if frame is not None else None
        candidate = frame.f_locals.get("self") if frame is not None else None
        if isinstance(getattr(candidate, "py_dataset", None), ResumableBatches):
            adapter = candidate
            break
    if adapter is not None and getattr(adapter, "shuffle", False):
        log.warning("ResumableBatches shuffles by itself: ignoring fit(shuffle=True) (pass shuffle=False)")
        adapter.shuffle = False
        if getattr(adapter, "enqueuer", None) is not None:
            adapter.enqueuer.shuffle = False


def set_random_seed(seed: int) -> None:
    """keras.utils.set_random_seed, without importing TensorFlow on other backends.

    Keras' own imports TensorFlow whenever it is installed, to seed it too; with the torch backend
    that puts TensorFlow and triton in one process, which crashes (tensorflow/tensorflow#124205).
    """
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    import random

    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator
    from keras.src.utils import rng_utils

    global_state.set_global_attribute(rng_utils.GLOBAL_RANDOM_SEED, seed)
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch
        torch.manual_seed(seed)


def weights_sha256(model: Any) -> str:
    """A hash of the model's weights (names and bytes, in order), to compare runs bit for bit."""
    digest = hashlib.sha256()
    prefix = f"{model.name}/"
    for variable in model.weights:
        # Keras puts the model's name in front of a path only when the model built the layer itself
        # (not when keras.models.load_model did): leave it out so both hash alike.
        name = variable.path[len(prefix):] if variable.path.startswith(prefix) else variable.path
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(host_array(variable)).tobytes())
    return digest.hexdigest()

