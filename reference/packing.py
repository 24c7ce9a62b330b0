"""Driver side: split a model or pipeline into a small skeleton and a table of storages.

The skeleton is the whole object pickled with every tensor replaced by a persistent id.
Each tensor is described by a :class:`TensorSpec` (dtype, shape, stride, storage offset)
pointing into a list of unique storages, so tied weights and views keep sharing bytes
and every layout survives exactly. The storages become zero-copy uint8 numpy views,
which Ray writes into the object store out of band: the only copy made is the one
into shared memory.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ray import cloudpickle

from . import graph
from .errors import NoModulesError, UnpicklableAttributeError, UnsupportedTensorError

PARAMETER = "parameter"
TENSOR = "tensor"


@dataclass(frozen=True)
class TensorSpec:
    """How to rebuild one tensor as a view of a shared storage."""

    storage: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool
    kind: str


@dataclass
class Payload:
    """What goes into the object store: skeleton bytes, tensor specs and storage bytes."""

    skeleton: bytes
    specs: list[TensorSpec]
    storages: list[np.ndarray]
    methods: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(int(s.nbytes) for s in self.storages)


@dataclass
class _Table:
    names: dict[int, str]
    specs: list[TensorSpec] = field(default_factory=list)
    storages: list[np.ndarray] = field(default_factory=list)
    tensor_index: dict[int, int] = field(default_factory=dict)
    storage_index: dict[tuple, int] = field(default_factory=dict)
    # Strong references keep ids stable while pickling runs.
    _alive: list[Any] = field(default_factory=list)

    def add(self, t: torch.Tensor) -> int:
        if id(t) in self.tensor_index:
            return self.tensor_index[id(t)]
        name = self.names.get(id(t))
        try:
            _check_supported(t, name or "<unnamed tensor>")
        except UnsupportedTensorError as exc:
            if name is None:
                raise _Unlocated(str(exc)) from None
            raise
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr(), storage.nbytes())
        if storage.nbytes() == 0:
            key = ("empty", len(self.storages))
        if key not in self.storage_index:
            self.storage_index[key] = len(self.storages)
            self.storages.append(_storage_bytes(storage))
        spec = TensorSpec(
            storage=self.storage_index[key],
            dtype=t.dtype,
            shape=tuple(t.shape),
            stride=tuple(t.stride()),
            offset=t.storage_offset(),
            requires_grad=t.requires_grad,
            kind=PARAMETER if isinstance(t, torch.nn.Parameter) else TENSOR,
        )
        self.tensor_index[id(t)] = len(self.specs)
        self.specs.append(spec)
        self._alive.append(t)
        return self.tensor_index[id(t)]


class _Unlocated(UnsupportedTensorError):
    """An unsupported tensor or storage the graph walk did not reach (in a closure, say)."""


def _check_supported(t: torch.Tensor, name: str) -> None:
    problem = None
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        problem = f"is a tensor subclass {type(t).__qualname__}"
    elif t.layout != torch.strided:
        problem = f"has layout {t.layout} (only dense strided tensors can be shared)"
    elif t.is_quantized:
        problem = "is quantized"
    elif t.is_nested:
        problem = "is a nested tensor"
    elif t.device.type == "meta":
        problem = "is on the meta device and has no data"
    elif t.is_conj() or t.is_neg():
        problem = "carries a lazy conj/neg bit (call resolve_conj()/resolve_neg() first)"
    elif t.grad_fn is not None:
        problem = "is not a leaf tensor (it has a grad_fn); detach it first"
    if problem:
        raise UnsupportedTensorError(f"tensor {name!r} {problem}")


def _storage_bytes(storage: torch.UntypedStorage) -> np.ndarray:
    """A uint8 numpy view of the storage's bytes (CPU); a host copy for device storages."""
    as_bytes = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
    if as_bytes.device.type != "cpu":
        as_bytes = as_bytes.cpu()
    return as_bytes.numpy()


class _SkeletonPickler(cloudpickle.Pickler):
    def __init__(self, file, table: _Table):
        super().__init__(file, protocol=5)
        self.table = table

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            return ("zc-tensor", self.table.add(obj))
        if isinstance(obj, (torch.UntypedStorage, torch.TypedStorage)):
            raise _Unlocated(f"a bare {type(obj).__name__} was found in the model; share tensors, not storages")
        return None


def _dump_skeleton(obj: Any, table: _Table) -> bytes:
    buf = io.BytesIO()
    _SkeletonPickler(buf, table).dump(obj)
    return buf.getvalue()


def public_methods(obj: Any) -> tuple[str, ...]:
    """Public methods the user's own class defines, plus ``forward``/``__call__``."""
    names = {"__call__"}
    for klass in type(obj).__mro__:
        if klass in (torch.nn.Module, object):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and callable(value):
                names.add(name)
    return tuple(sorted(names))


def _located(obj: Any, names: dict[int, str], exc: Exception) -> Exception:
    """The error for a failed skeleton pickle, naming the attribute at fault."""
    try:
        found = graph.first_unpicklable(obj, lambda o: _dump_skeleton(o, _Table(names=names)))
    except RecursionError:
        # Too deep for the recursive search (and for pickle): blame the deepest path.
        deepest = max((path for path, _ in graph.walk(obj)), key=len)
        shown = deepest if len(deepest) <= 120 else deepest[:120] + "..."
        return UnpicklableAttributeError(f"attribute {shown!r} is nested too deeply to pickle: {exc}")
    if isinstance(exc, UnsupportedTensorError):
        where = f"attribute {found[0]!r}" if found else "an attribute the search did not reach"
        return UnsupportedTensorError(f"{where} holds an unsupported tensor: {exc}")
    if found is None:
        return UnpicklableAttributeError(f"the model skeleton cannot be pickled: {exc}")
    path, value, error = found
    return UnpicklableAttributeError(
        f"attribute {path!r} of type {type(value).__qualname__} cannot be pickled "
        f"({type(error).__name__}: {error}); remove it or make it picklable"
    )


def pack(obj: Any) -> tuple[Payload, list[torch.Tensor]]:
    """Split ``obj`` into a skeleton and unique storages, validating every tensor.

    Also returns the original tensors in spec order (to re-point them if asked).
    """
    if not graph.has_module(obj):
        raise NoModulesError(
            f"{type(obj).__qualname__} holds no torch.nn.Module in its attributes, lists, "
            "tuples or dicts; there are no weights to share"
        )
    table = _Table(names=graph.tensor_paths(obj))
    try:
        skeleton = _dump_skeleton(obj, table)
    except UnsupportedTensorError as exc:
        if not isinstance(exc, _Unlocated):
            raise
        raise _located(obj, table.names, exc) from exc
    except Exception as exc:
        raise _located(obj, table.names, exc) from exc
    return Payload(skeleton, table.specs, table.storages, public_methods(obj)), table._alive
