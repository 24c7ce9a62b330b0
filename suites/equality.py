"""Exact comparison of model outputs, with a message that says where they differ."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def first_difference(a: Any, b: Any, path: str = "output") -> str | None:
    """None when ``a`` and ``b`` are bit-identical (``torch.equal``, dtype included), else where they differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{path}: {type(a).__name__} vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a.detach().cpu(), b.detach().cpu()):
            diff = (a.detach().cpu().double() - b.detach().cpu().double()).abs()
            return f"{path}: values differ (max abs diff {diff.max().item():.3g}, {int((diff > 0).sum())} elements)"
        return None
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if list(a.keys()) != list(b.keys()):
            return f"{path}: keys {list(a.keys())} vs {list(b.keys())}"
        for k in a:
            found = first_difference(a[k], b[k], f"{path}[{k!r}]")
            if found:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    if hasattr(a, "to_tuple") and hasattr(b, "to_tuple"):  # transformers ModelOutput
        return first_difference(a.to_tuple(), b.to_tuple(), path)
    return None if a == b else f"{path}: {a!r} vs {b!r}"


def assert_same(actual: Any, expected: Any, what: str = "output") -> None:
    """Fail with the first difference between ``actual`` and ``expected``."""
    found = first_difference(actual, expected, what)
    assert found is None, f"not identical to the original model: {found}"
