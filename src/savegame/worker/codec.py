"""Nested state (dicts, lists, tuples, numbers, strings, tensors) to JSON plus named tensors, and back.

This replaces pickle: only these types are representable, so loading a checkpoint can never run
code. Framework adapters pass in how to recognise a tensor and how to look one up when decoding.
"""
from __future__ import annotations

import base64
from typing import Any, Callable

TENSOR, TUPLE, DICT, ITEMS, BYTES = "__tensor__", "__tuple__", "__dict__", "__items__", "__bytes__"


class Encoder:
    """Encodes objects; tensors are collected in `tensors` (name -> tensor), in encounter order."""

    def __init__(self, is_tensor: Callable[[Any], bool]) -> None:
        self._is_tensor = is_tensor
        self.tensors: dict[str, Any] = {}

    def encode(self, obj: Any, path: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            return float(obj)
        if self._is_tensor(obj):
            if path in self.tensors:
                raise ValueError(f"two tensors share the name {path!r}")
            self.tensors[path] = obj
            return {TENSOR: path}
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {DICT: {k: self.encode(v, f"{path}.{k}") for k, v in obj.items()}}
            return {ITEMS: [[self.encode(k, f"{path}.key{i}"), self.encode(v, f"{path}.{_label(k, i)}")]
                            for i, (k, v) in enumerate(obj.items())]}
        if isinstance(obj, (list, tuple)):
            items = [self.encode(v, f"{path}.{i}") for i, v in enumerate(obj)]
            return {TUPLE: items} if isinstance(obj, tuple) else items
        if isinstance(obj, (bytes, bytearray)):
            return {BYTES: base64.b64encode(bytes(obj)).decode()}
        scalar = getattr(obj, "item", None)  # numpy scalars
        if callable(scalar) and getattr(obj, "shape", None) == ():
            return self.encode(scalar(), path)
        raise TypeError(f"{path}: cannot save a {type(obj).__module__}.{type(obj).__name__} in a checkpoint "
                        "(only tensors, numbers, strings, bytes, lists, tuples and dicts; pickle is never used)")


def _label(key: Any, index: int) -> str:
    return str(key) if isinstance(key, (int, str)) else f"item{index}"


def decode(obj: Any, tensor: Callable[[str], Any]) -> Any:
    """The inverse of Encoder.encode; `tensor(name)` returns the loaded tensor of that name."""
    if isinstance(obj, list):
        return [decode(v, tensor) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) != 1:
        raise ValueError(f"malformed encoded object with keys {sorted(obj)[:5]}")
    (tag, value), = obj.items()
    if tag == TENSOR:
        return tensor(value)
    if tag == TUPLE:
        return tuple(decode(v, tensor) for v in value)
    if tag == DICT:
        return {k: decode(v, tensor) for k, v in value.items()}
    if tag == ITEMS:
        return {decode(k, tensor): decode(v, tensor) for k, v in value}
    if tag == BYTES:
        return base64.b64decode(value)
    raise ValueError(f"unknown tag {tag!r} in an encoded object")
