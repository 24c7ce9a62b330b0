"""The metadata floor of a load: what building the model's tensors as views costs, with no bytes moved.

Any zero-copy load must at least create one tensor per parameter and buffer, pointing into
memory that already holds the bytes, and wrap the parameters in ``nn.Parameter``. Doing
just that for a model's tensors (over the model's own storages, so nothing is allocated
or touched) gives a floor for the load time at that tensor count; the report draws it
under every implementation's line. Measured in the driver in the same run, minimum of a
few repeats, Python's cyclic collector paused (it is a floor, not a typical time).
"""

from __future__ import annotations

import gc
import time
from typing import Any

import torch
from zcbench.suites import probes


def tensor_specs(model: Any) -> list[tuple[torch.Tensor, bool]]:
    """Each distinct tensor of the model once, with whether it is a Parameter."""
    seen: dict[int, tuple[torch.Tensor, bool]] = {}
    for _, t in probes.named_tensors(model):
        seen.setdefault(id(t), (t, isinstance(t, torch.nn.Parameter)))
    return list(seen.values())


def build_views(specs: list[tuple[torch.Tensor, bool]]) -> list[torch.Tensor]:
    """One new tensor per spec, viewing the same storage, offset, shape and stride; Parameters re-wrapped."""
    out = []
    for t, is_param in specs:
        v = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        out.append(torch.nn.Parameter(v, requires_grad=t.requires_grad) if is_param else v)
    return out


def metadata_floor_s(model: Any, repeats: int = 5) -> float:
    """Seconds to build every tensor of ``model`` as a view (see the module doc); the minimum of ``repeats``."""
    specs = tensor_specs(model)
    best = float("inf")
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            views = build_views(specs)
            best = min(best, time.perf_counter() - start)
            del views
    finally:
        if enabled:
            gc.enable()
    return best
