"""Actor side: rebuild the model from the skeleton, with tensors as views of shared bytes."""

from __future__ import annotations

import io
import pickle
import warnings
from typing import Any

import numpy as np
import torch

from .packing import PARAMETER, Payload, TensorSpec


class _SkeletonUnpickler(pickle.Unpickler):
    def __init__(self, file, build_tensor):
        super().__init__(file)
        self._build_tensor = build_tensor
        self._built: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid):
        kind, index = pid
        if kind != "zc-tensor":
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        # One tensor object per index: a tensor referenced twice (tied weights) stays one object.
        if index not in self._built:
            self._built[index] = self._build_tensor(index)
        return self._built[index]


def storages_from(buffers: list[np.ndarray]) -> list[torch.UntypedStorage]:
    """Wrap uint8 numpy buffers as torch storages without copying."""
    with warnings.catch_warnings():
        # Ray's arrays are flagged read-only; the private views handed here are writable.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [torch.from_numpy(b).untyped_storage() for b in buffers]


def _view(storage: torch.UntypedStorage, spec: TensorSpec, device: torch.device) -> torch.Tensor:
    # The storage may already live on ``device`` (the GPU path maps it there): then no copy.
    t = torch.empty(0, dtype=spec.dtype, device=storage.device).set_(storage, spec.offset, spec.shape, spec.stride)
    if t.device != device:
        t = t.to(device)
    if spec.kind == PARAMETER:
        return torch.nn.Parameter(t, requires_grad=spec.requires_grad)
    return t.requires_grad_(spec.requires_grad)


def unpack(payload: Payload, storages: list[torch.UntypedStorage], device: torch.device) -> Any:
    """Rebuild the pickled object with every tensor a view of ``storages``."""

    def build(index: int) -> torch.Tensor:
        spec = payload.specs[index]
        return _view(storages[spec.storage], spec, device)

    return _SkeletonUnpickler(io.BytesIO(payload.skeleton), build).load()
