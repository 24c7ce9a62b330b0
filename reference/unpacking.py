"""Actor side: rebuild the model from the skeleton, with tensors as views of shared bytes."""

from __future__ import annotations

import gc
import io
import pickle
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .packing import Payload


class gc_paused:  # noqa: N801 - used like a function: ``with gc_paused():``
    """Pause Python's cyclic collector, restoring the caller's setting however the block ends.

    A load creates several objects per tensor; with the collector on, they trigger full
    collections over everything built so far, which made loads grow faster than the tensor
    count (5,000 tensors: 117 ms with it, 55 ms without). The loaded objects are not frozen
    (``gc.freeze``): that would also freeze every unrelated object in the process, and a model
    with a reference cycle (a hook bound to its own module) could then never be freed.
    """

    def __enter__(self) -> None:
        self.enabled = gc.isenabled()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            gc.enable()


def storages_from(buffers: Sequence[np.ndarray]) -> list[torch.UntypedStorage]:
    """Wrap uint8 numpy buffers as torch storages without copying."""
    if all(b.flags.writeable for b in buffers):
        return [torch.from_numpy(b).untyped_storage() for b in buffers]
    with warnings.catch_warnings():
        # Ray's arrays are flagged read-only; the private views handed here are writable.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return [torch.from_numpy(b).untyped_storage() for b in buffers]


def slice_storages(segments: Sequence[torch.UntypedStorage], places: Sequence[tuple[int, int, int]]) -> list[torch.UntypedStorage]:
    """One storage per original storage, each a slice of its segment (slicing shares the memory).

    Every original storage gets its own storage object again, so which tensors share one
    (views, ties) is exactly as in the original model; a slice keeps its segment alive.
    """
    out = []
    for segment, offset, nbytes in places:
        base = segments[segment]
        out.append(base if offset == 0 and nbytes == base.nbytes() else base[offset : offset + nbytes])
    return out


def build_tensors(specs: Sequence[tuple], storages: Sequence[torch.UntypedStorage]) -> list[torch.Tensor]:
    """Each spec as a view of its storage: a Parameter or a plain tensor, with its requires_grad."""
    empty = torch.empty
    tensors = []
    for storage, dtype, shape, stride, offset, requires_grad, is_parameter in specs:
        s = storages[storage]
        tensors.append(_finish(empty(0, dtype=dtype, device=s.device).set_(s, offset, shape, stride), requires_grad, is_parameter))
    return tensors


def build_tensors_from_buffers(payload: Payload, buffers: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """:func:`build_tensors` from the segments as writable uint8 numpy arrays (the CPU path), faster.

    A tensor alone on its storage is made by one ``torch.frombuffer`` over exactly that
    storage's bytes (its own storage, as in the original), instead of a storage slice, an
    empty tensor and ``set_``: 2.4x faster per tensor. Storages several tensors view are
    sliced once and shared, as :func:`build_tensors` does.
    """
    places, shared = payload.places, payload.shared
    frombuffer, empty, make_subclass, parameter = torch.frombuffer, torch.empty, torch.Tensor._make_subclass, torch.nn.Parameter
    bases: list[torch.UntypedStorage] | None = None
    sliced: dict[int, torch.UntypedStorage] = {}
    tensors = []
    for storage, dtype, shape, stride, offset, requires_grad, is_parameter in payload.specs:
        segment, start, nbytes = places[storage]
        count, rest = divmod(nbytes, dtype.itemsize)
        if storage not in shared and count and not rest:
            t = frombuffer(buffers[segment], dtype=dtype, count=count, offset=start)
            if offset or stride != (1,) or shape != (count,):
                t.as_strided_(shape, stride, offset)
        else:
            if storage not in sliced:
                bases = storages_from(buffers) if bases is None else bases
                sliced[storage] = slice_storages(bases, [places[storage]])[0]
            t = empty(0, dtype=dtype).set_(sliced[storage], offset, shape, stride)
        # _finish, inlined: this loop runs once per tensor.
        if is_parameter:
            t = make_subclass(parameter, t, requires_grad)
        elif requires_grad:
            t.requires_grad_(True)
        tensors.append(t)
    return tensors


def _finish(t: torch.Tensor, requires_grad: bool, is_parameter: bool) -> torch.Tensor:
    if is_parameter:
        # What Parameter(t, requires_grad) does for a plain tensor, without its Python frame.
        return torch.Tensor._make_subclass(torch.nn.Parameter, t, requires_grad)
    return t.requires_grad_(True) if requires_grad else t


def rebuild(payload: Payload, tensors: list[torch.Tensor]) -> Any:
    """Unpickle the skeleton with ``tensors`` in place of its persistent ids."""
    unpickler = pickle.Unpickler(io.BytesIO(payload.skeleton))
    # A persistent id is the tensor's index; a tensor referenced twice (tied weights) stays one object.
    unpickler.persistent_load = tensors.__getitem__
    return unpickler.load()


def unpack(payload: Payload, storages: Sequence[torch.UntypedStorage], device: torch.device | None = None) -> Any:
    """Rebuild the pickled object with every tensor a view of ``storages`` (one per original storage).

    The tensors live where the storages do; ``device``, if given, must be that device.
    """
    if device is not None:
        want = torch.device(device)
        if any(s.device.type != want.type or want.index not in (None, s.device.index) for s in storages):
            raise ValueError(f"the storages are not on {want}; map or copy them there first")
    return rebuild(payload, build_tensors(payload.specs, storages))


def unpack_buffers(payload: Payload, buffers: Sequence[np.ndarray]) -> Any:
    """:func:`unpack` from the payload's segments as writable uint8 numpy arrays (CPU)."""
    return rebuild(payload, build_tensors_from_buffers(payload, buffers))
