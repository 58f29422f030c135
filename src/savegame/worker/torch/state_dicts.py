"""The state of tracked objects in a torch.distributed job, through DCP's state-dict helpers.

Models: `get_model_state_dict` (DDP's "module." prefix dropped; FSDP2's parameters as DTensors).
Optimizers: `get_optimizer_state_dict`, keyed by parameter names rather than positions, so a job
of another size (or another wrapping) can load them. Anything else: its own state_dict().
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from savegame.errors import ConfigError


def object_state_dicts(objects: Mapping[str, Any]) -> dict[str, Any]:
    modules = {name: obj for name, obj in objects.items() if isinstance(obj, nn.Module)}
    out: dict[str, Any] = {}
    for name, obj in objects.items():
        if isinstance(obj, nn.Module):
            out[name] = get_model_state_dict(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            out[name] = get_optimizer_state_dict(owner_module(name, obj, modules), obj)
        else:
            out[name] = obj.state_dict()
    return out


def load_object(name: str, obj: Any, state: Any, objects: Mapping[str, Any]) -> None:
    """Load one tracked object's state (tensors already in place: this rank's shards)."""
    modules = {n: o for n, o in objects.items() if isinstance(o, nn.Module)}
    if isinstance(obj, nn.Module):
        set_model_state_dict(obj, state, options=StateDictOptions(strict=True))
    elif isinstance(obj, torch.optim.Optimizer):
        set_optimizer_state_dict(owner_module(name, obj, modules), obj, state)
    else:
        obj.load_state_dict(state)


def owner_module(name: str, optimizer: torch.optim.Optimizer, modules: Mapping[str, nn.Module]) -> nn.Module:
    """The tracked model whose parameters the optimizer updates (DCP names its state by them)."""
    params = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for module in modules.values():
        if params <= {id(p) for p in module.parameters()}:
            return module
    raise ConfigError(f"track(): the optimizer {name!r} updates parameters of no tracked model; track the model "
                      "it trains (model=...) in the same Checkpointer")
