"""Naming the attribute that cannot be pickled, for adapters that pickle a model or its skeleton.

A bare ``cannot pickle '_thread.lock' object`` does not say where the lock is; the
search below pickles the parts of the object one by one (only after a failure) and
names the path of the innermost part that fails.
"""

from __future__ import annotations

from typing import Any

import torch
from ray import cloudpickle

#: How deep the search descends into nested attributes before naming what it reached.
MAX_DEPTH = 32


def _parts(value: Any) -> list[tuple[str, Any]]:
    """The directly contained values of a container, module or plain object, with their path suffix."""
    if isinstance(value, dict):
        return [(f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, torch.nn.Module):
        # Tensors pickle; submodules read as attributes, the way users name them.
        state = {k: v for k, v in vars(value).items() if k not in ("_modules", "_parameters", "_buffers")}
        return [(f".{k}", v) for k, v in {**state, **value._modules}.items()]
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return [(f".{k}", v) for k, v in vars(value).items()]
    return []


def _fails(value: Any) -> bool:
    try:
        cloudpickle.dumps(value)
    except Exception:  # noqa: BLE001 - any failure is what we look for
        return True
    return False


def unpicklable_path(obj: Any) -> str | None:
    """The attribute path (``encoder.lock``, ``heads['x']``) of the innermost part of ``obj`` that cannot be pickled."""
    path, value = "", obj
    for _ in range(MAX_DEPTH):
        bad = next(((suffix, part) for suffix, part in _parts(value) if _fails(part)), None)
        if bad is None:
            break
        path, value = path + bad[0], bad[1]
    return path.lstrip(".") or None


def naming_culprit(obj: Any, exc: Exception) -> Exception:
    """``exc`` as a TypeError that names the unpicklable attribute of ``obj``, or ``exc`` itself if none is found."""
    path = unpicklable_path(obj)
    if path is None:
        return exc
    return TypeError(f"cannot pickle attribute {path!r} of the {type(obj).__name__}: {exc}")
