"""Walks a model or pipeline object graph, giving each object a readable path.

The paths name things in error messages ("pipeline.encoder.layers[3].weight"), so a
user sees exactly which attribute is unsupported.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

_LEAF_TYPES = (str, bytes, bytearray, int, float, complex, bool, type(None), type)


def _children(obj: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, torch.nn.Module):
        for name, child in obj._modules.items():
            yield f"{path}.{name}", child
        for name, t in obj._parameters.items():
            yield f"{path}.{name}", t
        for name, t in obj._buffers.items():
            yield f"{path}.{name}", t
        internal = {"_modules", "_parameters", "_buffers"}
        for name, value in vars(obj).items():
            if name not in internal:
                yield f"{path}.{name}", value
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{path}[{key!r}]", value
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for i, value in enumerate(obj):
            yield f"{path}[{i}]", value
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        try:
            attrs = vars(obj)
        except TypeError:
            return
        for name, value in attrs.items():
            yield f"{path}.{name}", value


def walk(root: Any, root_name: str = "model") -> Iterator[tuple[str, Any]]:
    """Yield ``(path, obj)`` for every object reachable from ``root``, each object once."""
    seen: set[int] = set()
    stack = [(root_name, root)]
    while stack:
        path, obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        yield path, obj
        if isinstance(obj, (torch.Tensor, *_LEAF_TYPES)) or callable(obj) and not hasattr(obj, "__dict__"):
            continue
        children = list(_children(obj, path))
        stack.extend(reversed(children))


def tensor_paths(root: Any) -> dict[int, str]:
    """Map ``id(tensor)`` to the first path where it was found."""
    return {id(obj): path for path, obj in walk(root) if isinstance(obj, torch.Tensor)}


def has_module(root: Any) -> bool:
    """Whether any ``torch.nn.Module`` is reachable from ``root``."""
    return any(isinstance(obj, torch.nn.Module) for _, obj in walk(root))


def first_unpicklable(
    root: Any, dumps, root_name: str = "model", _seen: set[int] | None = None
) -> tuple[str, Any, BaseException] | None:
    """Find the deepest attribute under ``root`` that ``dumps`` cannot pickle.

    Only called after pickling the whole object failed, so its cost (re-pickling
    subtrees) is paid on the error path alone.
    """
    seen = set() if _seen is None else _seen
    if id(root) in seen:
        return None
    seen.add(id(root))
    try:
        dumps(root)
        return None
    except Exception as exc:  # noqa: BLE001 - any pickling failure is what we look for
        error = exc
    if not isinstance(root, (torch.Tensor, *_LEAF_TYPES)):
        for path, child in _children(root, root_name):
            found = first_unpicklable(child, dumps, path, seen)
            if found is not None:
                return found
    return root_name, root, error
