"""PyTorch adapter: models, optimizers, schedulers, GradScalers, RNG states and the data position.

Saving copies every tensor into one reusable host buffer (pinned when the state is on a GPU), so
the training thread pays one memcpy; the buffer is written in the background. Under the
shared-memory hand-over, CPU tensors are copied straight into the daemon's segment instead. Restoring reads
straight into the model's own CPU tensors where it can, and into fresh CPU tensors otherwise;
`load_state_dict` then moves them to the right device, so a GPU checkpoint loads on a CPU-only
machine. Nothing is unpickled: tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterable, Iterator, Optional

import torch

from savegame.errors import ConfigError, CorruptCheckpoint
from savegame.worker.adapter import Capture, CheckpointReader, Reserve
from savegame.worker.codec import Encoder, decode
from savegame.worker.exits import warn_once
from savegame.worker.safetensors_io import TensorBlob, TensorInfo
from savegame.worker.torch.buffers import DTYPES, TORCH_DTYPES, HostBuffers
from savegame.worker.torch.loader import shield_loader_workers
from savegame.worker.torch.buffers import bytes_view as _bytes_view



class TorchAdapter:
    framework = "torch"

    def __init__(self) -> None:
        self.objects: dict[str, Any] = {}
        self._buffers = HostBuffers()
        self.live_state_damaged = False  # a failed restore left partly-read data in the model

    def add(self, **objects: Any) -> None:
        for name, obj in objects.items():
            if "." in name:
                raise ConfigError(f"track(): the name {name!r} must not contain '.'")
            if isinstance(obj, ResumableSampler):
                continue  # its position is the Checkpointer's progress; nothing else to save
            if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise ConfigError(f"track(): {name}={type(obj).__name__} has no state_dict()/load_state_dict()")
            self.objects[name] = obj

    # -- saving ---------------------------------------------------------------------------------

    def _encode(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Every tensor to save, by name, and the JSON skeleton that refers to them."""
        encoder = Encoder(lambda x: isinstance(x, torch.Tensor))
        skeleton = {name: encoder.encode(obj.state_dict(), name) for name, obj in self.objects.items()}
        rng = encoder.encode(_torch_rng_states(), "rng")
        modules = [name for name, obj in self.objects.items() if isinstance(obj, torch.nn.Module)]
        return encoder.tensors, {"objects": skeleton, "rng": rng, "modules": modules}  # modules: what export takes

    def capture(self) -> Capture:
        return self.capture_into(None)

    def capture_into(self, reserve: Optional[Reserve]) -> Capture:
        """capture(), with CPU tensors copied into the memory `reserve` lends (a shared-memory segment)."""
        tensors, state = self._encode()
        blobs, fill, ready, reserved = self._buffers.plan(tensors, reserve)
        return Capture(blobs=blobs, state=state, fill=fill, ready=ready, reserved=reserved)

    def capture_in_place(self) -> Capture:
        """For a save that training waits out (emergency, final): CPU tensors are written from their
        own memory, with no copy; with any tensor on a GPU, the usual pinned-buffer copy."""
        tensors, state = self._encode()
        if any(t.device.type != "cpu" or t.dtype not in DTYPES for t in tensors.values()):
            return Capture(blobs=self._buffers.copy(tensors), state=state)
        blobs = [TensorBlob(name, DTYPES[t.dtype], tuple(t.shape), memoryview(_bytes_view(t.detach().contiguous()).numpy()))
                 for name, t in tensors.items()]
        return Capture(blobs=blobs, state=state)

    # -- restoring ------------------------------------------------------------------------------

    def restore(self, reader: CheckpointReader) -> None:
        state = reader.state.get("adapter", {})
        saved = state.get("objects", {})
        missing = sorted(set(self.objects) - set(saved))
        if missing:
            raise ConfigError(f"{reader.info.path} holds no state for {missing}; it was saved by another script")
        self._check_modules(saved, reader)
        model = self._model_tensors()
        in_place = {name: t for name, t in model.items() if t.device.type == "cpu" and t.is_contiguous()}
        referenced = _tensor_names(state)
        loaded: dict[str, torch.Tensor] = {}

        def check(infos: list[TensorInfo]) -> None:  # before any byte lands in the model
            _check_fit(infos, model, referenced, reader.info.path)

        def allocate(info: TensorInfo) -> memoryview:
            target = in_place.get(info.name)
            if target is None:
                target = torch.empty(info.shape, dtype=TORCH_DTYPES[info.dtype])
            else:
                self.live_state_damaged = True  # until this restore has completed
            loaded[info.name] = target
            return memoryview(_bytes_view(target).numpy())

        with torch.no_grad():
            reader.read_tensors(allocate, check)
        tensor = _lookup(loaded, reader)
        for name, obj in self.objects.items():
            self._load_object(name, obj, decode(saved[name], tensor), in_place, reader)
        _set_torch_rng_states(decode(state.get("rng", {"__dict__": {}}), tensor))
        self.live_state_damaged = False

    def _check_modules(self, saved: dict[str, Any], reader: CheckpointReader) -> None:
        """A checkpoint of another model is refused before anything is read into this one."""
        for name, obj in self.objects.items():
            if isinstance(obj, torch.nn.Module):
                keys, expected = set(decode(saved[name], lambda _: None)), set(obj.state_dict())
                if keys != expected:
                    raise ConfigError(f"{reader.info.path}: {name} does not match the model: missing "
                                      f"{sorted(expected - keys)[:5]}, unexpected {sorted(keys - expected)[:5]}")

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the tracked modules, on any device: what a checkpoint must fit exactly."""
        return {f"{name}.{key}": t for name, obj in self.objects.items() if isinstance(obj, torch.nn.Module)
                for key, t in obj.state_dict().items()}

    def _load_object(self, name: str, obj: Any, state: Any, in_place: dict[str, torch.Tensor],
                     reader: CheckpointReader) -> None:
        if isinstance(obj, torch.nn.Module) and all(f"{name}.{key}" in in_place for key in state):
            return  # every tensor was read straight into the model
        try:
            # Tensors arrive on the CPU; load_state_dict copies them to each parameter's device (and
            # optimizers move their state to their parameters' devices), so GPU checkpoints load anywhere.
            obj.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ConfigError(f"{reader.info.path}: cannot load {name}: {exc}") from None

    # -- data position --------------------------------------------------------------------------

    def prepare_loader(self, loader: Iterable[Any], epoch: int, skip_batches: int,
                       mid_epoch: bool) -> tuple[Iterator[Any], int]:
        """Point a ResumableSampler at this epoch and resume position; returns (iterator, batches skipped)."""
        shield_loader_workers(loader)
        if _is_stateful(loader):
            tracked = any(loader is obj for obj in self.objects.values())
            if tracked:  # its own state_dict is the data position: restored already, nothing to skip
                with preserved_rng() if mid_epoch else contextlib.nullcontext():
                    return iter(loader), skip_batches
            warn_once("untracked-loader", "a StatefulDataLoader that is not tracked: ckpt.track(loader=loader) "
                                          "so its position is saved and a resume continues exactly")
        sampler, batch_size = _resumable_sampler(loader)
        skipped = 0
        if mid_epoch and skip_batches and sampler is None and _shuffles(loader):
            warn_once("shuffle", f"resuming in the middle of an epoch from a DataLoader(shuffle=True): the "
                                 f"{skip_batches} batches skipped come from a new shuffle, so this epoch is not the "
                                 "one an uninterrupted run trains; use sampler=savegame.torch.ResumableSampler("
                                 "dataset, seed=...) (or torchdata's StatefulDataLoader, tracked) for an exact resume")
        if sampler is not None:
            sampler.set_epoch(epoch)
            if skip_batches and batch_size:
                sampler.set_start(skip_batches * batch_size)
                skipped = skip_batches
        # Resuming mid-epoch, the saved RNG state already reflects this epoch's iter(loader).
        with preserved_rng() if mid_epoch else contextlib.nullcontext():
            iterator = iter(loader)
        return iterator, skipped


def _tensor_names(state: dict[str, Any]) -> set[str]:
    """The names of the tensors the JSON state refers to."""
    names: set[str] = set()
    for encoded in [*state.get("objects", {}).values(), state.get("rng", {"__dict__": {}})]:
        decode(encoded, lambda name: names.add(str(name)))
    return names


def _check_fit(infos: list[TensorInfo], model: dict[str, torch.Tensor], referenced: set[str], where: str) -> None:
    """Refuse, before any byte is read, a file that lacks a tensor the state refers to, holds a model
    tensor of another dtype or shape than the live model's, or an RNG state that is not a byte vector."""
    missing = sorted(referenced - {info.name for info in infos})
    if missing:
        raise CorruptCheckpoint(f"{where}: tensors {missing[:3]} are missing from state.safetensors")
    for info in infos:
        live = model.get(info.name)
        if live is not None and (tuple(live.shape) != info.shape or live.dtype != TORCH_DTYPES[info.dtype]):
            raise ConfigError(f"{where}: tensor {info.name} is {info.dtype}{list(info.shape)}, the model's is "
                              f"{DTYPES.get(live.dtype, live.dtype)}{list(live.shape)}: the checkpoint does not "
                              "fit this model (it was saved by another model)")
        if info.name.startswith("rng.") and (info.dtype != "U8" or len(info.shape) != 1):
            raise CorruptCheckpoint(f"{where}: tensor {info.name} is {info.dtype}{list(info.shape)}, "
                                    "not a random generator state (U8[n])")


def _lookup(loaded: dict[str, torch.Tensor], reader: CheckpointReader) -> Any:
    def tensor(name: str) -> torch.Tensor:
        if name not in loaded:
            raise CorruptCheckpoint(f"{reader.info.path}: tensor {name!r} is missing from state.safetensors")
        return loaded[name]
    return tensor


def _torch_rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def _set_torch_rng_states(states: dict[str, Any]) -> None:
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    state = torch.get_rng_state()
    try:
        yield
    finally:
        torch.set_rng_state(state)


class ResumableSampler(torch.utils.data.Sampler[int]):
    """Shuffles like RandomSampler, but from (seed, epoch) alone, and can start mid-epoch.

    Use it as the DataLoader's sampler; `Checkpointer.batches` sets the epoch and the start, so a
    resumed run sees exactly the batches an uninterrupted run would have seen next. In a
    torch.distributed job it shards like DistributedSampler: every rank shuffles the same order,
    pads it to a multiple of the number of ranks, and takes every world_size-th index from its rank
    (`rank` and `num_replicas` default to the job's), so every rank runs the same number of steps.
    """

    def __init__(self, data_source: Any, shuffle: bool = True, seed: int = 0, *,
                 rank: Optional[int] = None, num_replicas: Optional[int] = None) -> None:
        self.size = data_source if isinstance(data_source, int) else len(data_source)
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.start = 0
        job_rank, job_size = _job_rank()
        self.rank = job_rank if rank is None else rank
        self.num_replicas = job_size if num_replicas is None else num_replicas
        if not 0 <= self.rank < self.num_replicas:
            raise ConfigError(f"ResumableSampler: rank {self.rank} is not in [0, {self.num_replicas})")
        self.shard_size = -(-self.size // self.num_replicas)  # padded like DistributedSampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        if self.num_replicas > 1:
            total = self.shard_size * self.num_replicas
            order = (order * (-(-total // max(len(order), 1))))[:total]  # pad by repeating the start
            order = order[self.rank:total:self.num_replicas]
        start, self.start = self.start, 0
        return iter(order[start:])

    def __len__(self) -> int:
        return (self.size if self.num_replicas == 1 else self.shard_size) - self.start


def _job_rank() -> tuple[int, int]:
    """(rank, number of ranks) of an initialized torch.distributed job, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _is_stateful(loader: Any) -> bool:
    """torchdata's StatefulDataLoader (Lightning, Accelerate and torchtitan use it): its state_dict()
    is its position, mid-epoch included."""
    return callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)) \
        and hasattr(loader, "batch_sampler")


def _shuffles(loader: Any) -> bool:
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", getattr(loader, "sampler", None))
    return isinstance(sampler, torch.utils.data.RandomSampler)


def _resumable_sampler(loader: Any) -> tuple[Optional[ResumableSampler], Optional[int]]:
    sampler = getattr(loader, "sampler", None)
    batch_size = getattr(loader, "batch_size", None)
    if not isinstance(sampler, ResumableSampler):
        batch_sampler = getattr(loader, "batch_sampler", None)
        sampler = getattr(batch_sampler, "sampler", None)
        batch_size = getattr(batch_sampler, "batch_size", None)
    return (sampler, batch_size) if isinstance(sampler, ResumableSampler) else (None, None)


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the model's weights (names and bytes, in order), to compare runs bit for bit."""
    digest = hashlib.sha256()
    for name, t in model.state_dict().items():
        digest.update(name.encode())
        digest.update(_bytes_view(t.detach().cpu().contiguous()).numpy().tobytes())
    return digest.hexdigest()
