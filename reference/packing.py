"""Driver side: split a model or pipeline into a small skeleton and a few buffers of storage bytes.

The skeleton is the whole object pickled with every tensor replaced by a persistent id, the
tensor's index in a table of :class:`TensorSpec` rows (dtype, shape, stride, storage offset)
pointing into a list of unique storages, so tied weights and views keep sharing bytes and
every layout survives exactly.

The storages are laid out in *segments*, each one contiguous buffer in the object store
(:func:`plan`): a storage of at least ``SMALL_STORAGE`` bytes is a segment of its own, handed to
Ray as a view of the tensor's own memory (the only copy is the one into shared memory); smaller
ones are packed side by side into shared buffers. A load then handles a few buffers instead
of one per storage (Ray's per-buffer cost, about 2 µs, dominated models of many small tensors).
Packing is a copy, so a pack holds at most :func:`pack_limit` bytes and every full pack is put
into the store on its own at once: the driver never holds more than one pack beyond the model.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import ray
import torch
from ray import cloudpickle

from . import graph
from .errors import NoModulesError, UnpicklableAttributeError, UnsupportedTensorError

#: Storage offsets inside a segment are multiples of this. It covers every dtype's itemsize
#: (complex128: 16), the CPU allocator's 64 bytes and the 256 bytes CUDA libraries test for
#: (cuBLAS picks kernels by pointer alignment, so a lesser one could change the result bits);
#: a segment copied to a GPU as one block keeps the same offsets.
ALIGNMENT = 256
#: Storages smaller than this are packed together; bigger ones travel as their own buffer.
SMALL_STORAGE = 64 * 1024
#: Packs are padded to whole pages: Ray aligns buffers of 2 KiB and more to 64 bytes.
_PAGE = 4096


class TensorSpec(NamedTuple):
    """How to rebuild one tensor as a view of a shared storage.

    The payload keeps these as plain tuples: unpickling 20,000 of them takes 6 ms, as
    dataclass objects 88 ms.
    """

    storage: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    requires_grad: bool
    parameter: bool


class Place(NamedTuple):
    """Where one storage's bytes lie: segment index, byte offset in it, length."""

    segment: int
    offset: int
    nbytes: int


@dataclass
class Payload:
    """What goes into the object store: skeleton, tensor specs, storage places and segments.

    A segment is a uint8 array (carried out of band in this object) or the ``ObjectRef``
    of a pack that was put on its own.
    """

    skeleton: bytes
    specs: list[tuple]
    places: list[tuple[int, int, int]]
    segments: list[np.ndarray | ray.ObjectRef]
    methods: tuple[str, ...] = ()
    #: Storages that more than one tensor views (the others are rebuilt by a faster path).
    shared: frozenset[int] = frozenset()

    @property
    def nbytes(self) -> int:
        """Bytes of the unique storages (without padding)."""
        return sum(p[2] for p in self.places)

    @property
    def num_storages(self) -> int:
        return len(self.places)

    def segment_arrays(self, get: Callable[[list[ray.ObjectRef]], list[np.ndarray]] = ray.get) -> list[np.ndarray]:
        """The segments as uint8 arrays; packs that were put on their own are fetched with one ``get``."""
        refs = [s for s in self.segments if isinstance(s, ray.ObjectRef)]
        fetched = iter(get(refs) if refs else ())
        return [next(fetched) if isinstance(s, ray.ObjectRef) else s for s in self.segments]

    @property
    def storages(self) -> list[np.ndarray]:
        """One uint8 view per unique storage, in spec order."""
        arrays = self.segment_arrays()
        return [arrays[seg][off : off + n] for seg, off, n in self.places]


def align(n: int, alignment: int = ALIGNMENT) -> int:
    """``n`` rounded up to a multiple of ``alignment``."""
    return -(-n // alignment) * alignment


def layout(sizes: Sequence[int], alignment: int = ALIGNMENT) -> tuple[list[int], int]:
    """Offsets that put blocks of ``sizes`` bytes one after another, each aligned; and the total length."""
    offsets, end = [], 0
    for n in sizes:
        start = align(end, alignment)
        offsets.append(start)
        end = start + n
    return offsets, end


def pack_limit(total: int) -> int:
    """Largest pack for a model of ``total`` bytes: 3% of it (the driver's peak stays within 1.05x), at least 1 MiB.

    The floor keeps the number of separate objects a load fetches small (each costs about
    45 µs in a ``ray.get``) for models of many small tensors, whose driver-side bookkeeping
    (about 1 KiB per tensor) outweighs one pack anyway.
    """
    return max(2**20, total // 32)


class Segment(NamedTuple):
    """One contiguous buffer: its length, and whether it is a pack (a copy) or one storage's own bytes."""

    length: int
    pack: bool


def plan(sizes: Sequence[int], small: int = SMALL_STORAGE, limit: int | None = None) -> tuple[list[Place], list[Segment]]:
    """Place storages of ``sizes`` bytes in segments; returns each storage's place and the segments.

    A storage of ``small`` bytes or more is a segment of its own (offset 0); smaller ones fill
    packs of at most ``limit`` bytes in order, each at an ``ALIGNMENT``-aligned offset.
    """
    limit = pack_limit(sum(sizes)) if limit is None else limit
    places: list[Place] = []
    segments: list[Segment] = []
    pack, used = -1, 0
    for n in sizes:
        if n >= small:
            places.append(Place(len(segments), 0, n))
            segments.append(Segment(n, pack=False))
            continue
        start = align(used)
        if pack < 0 or start + n > limit:
            pack, start = len(segments), 0
            segments.append(Segment(0, pack=True))
        places.append(Place(pack, start, n))
        used = start + n
        segments[pack] = Segment(align(used, _PAGE), pack=True)
    return places, segments


@dataclass
class _Table:
    root: Any
    specs: list[tuple] = field(default_factory=list)
    storages: list[torch.UntypedStorage] = field(default_factory=list)
    tensor_index: dict[int, int] = field(default_factory=dict)
    storage_index: dict[tuple, int] = field(default_factory=dict)
    # Equal shapes/strides become one object: a smaller pickle and fewer objects to build on load.
    interned: dict[tuple, tuple] = field(default_factory=dict)
    # Strong references keep ids stable while pickling runs.
    _alive: list[Any] = field(default_factory=list)
    _names: dict[int, str] | None = None

    @property
    def names(self) -> dict[int, str]:
        """``id(tensor)`` -> attribute path, for error messages; walked only when one is needed."""
        if self._names is None:
            self._names = graph.tensor_paths(self.root)
        return self._names

    def add(self, t: torch.Tensor) -> int:
        if id(t) in self.tensor_index:
            return self.tensor_index[id(t)]
        if _problem(t, "") is not None:
            name = self.names.get(id(t))
            if name is None:
                raise _Unlocated(_problem(t, "<unnamed tensor>"))
            raise UnsupportedTensorError(_problem(t, name))
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr(), storage.nbytes())
        if storage.nbytes() == 0:
            key = ("empty", len(self.storages))
        if key not in self.storage_index:
            self.storage_index[key] = len(self.storages)
            self.storages.append(storage)
        shape, stride = tuple(t.shape), t.stride()
        spec = TensorSpec(
            storage=self.storage_index[key],
            dtype=t.dtype,
            shape=self.interned.setdefault(shape, shape),
            stride=self.interned.setdefault(stride, stride),
            offset=t.storage_offset(),
            requires_grad=t.requires_grad,
            parameter=isinstance(t, torch.nn.Parameter),
        )
        self.tensor_index[id(t)] = len(self.specs)
        self.specs.append(tuple(spec))
        self._alive.append(t)
        return self.tensor_index[id(t)]


class _Unlocated(UnsupportedTensorError):
    """An unsupported tensor or storage the graph walk did not reach (in a closure, say)."""


def _problem(t: torch.Tensor, name: str) -> str | None:
    """Why ``t`` cannot be shared exactly (a message naming it), or None."""
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
    return f"tensor {name!r} {problem}" if problem else None


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


def _storage_bytes(storage: torch.UntypedStorage) -> np.ndarray:
    """A uint8 numpy view of the storage's bytes (CPU); a host copy for device storages."""
    as_bytes = _as_bytes(storage)
    if as_bytes.device.type != "cpu":
        as_bytes = as_bytes.cpu()
    return as_bytes.numpy()


def segments_of(
    storages: Sequence[torch.UntypedStorage], places: Sequence[Place], segments: Sequence[Segment]
) -> list[np.ndarray | ray.ObjectRef]:
    """The buffers of :func:`plan`: own segments as zero-copy views, packs filled (and all but the last put at once)."""
    members: dict[int, list[int]] = {}
    for i, p in enumerate(places):
        members.setdefault(p.segment, []).append(i)
    out: list[np.ndarray | ray.ObjectRef] = []
    last_pack = None  # the last pack travels inside the payload; earlier ones go to the store at once
    for index, segment in enumerate(segments):
        if not segment.pack:
            (only,) = members[index]
            out.append(_storage_bytes(storages[only]))
            continue
        buf = np.zeros(segment.length, np.uint8)  # zeros: the padding bytes are deterministic
        target = torch.from_numpy(buf)
        for i in members.get(index, []):
            p = places[i]
            if p.nbytes:
                target[p.offset : p.offset + p.nbytes].copy_(_as_bytes(storages[i]))
        if last_pack is not None:
            out[last_pack] = ray.put(out[last_pack])
        out.append(buf)
        last_pack = index
        del target, buf
    return out


class _SkeletonPickler(cloudpickle.Pickler):
    def __init__(self, file, table: _Table):
        super().__init__(file, protocol=5)
        self.table = table

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            return self.table.add(obj)
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


def _located(obj: Any, exc: Exception) -> Exception:
    """The error for a failed skeleton pickle, naming the attribute at fault."""
    try:
        found = graph.first_unpicklable(obj, lambda o: _dump_skeleton(o, _Table(root=obj)))
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


@dataclass
class Packed:
    """A validated model split into skeleton, specs and unique storages, before anything is stored."""

    skeleton: bytes
    specs: list[tuple]
    storages: list[torch.UntypedStorage]
    methods: tuple[str, ...]
    originals: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.storages)

    def payload(self) -> Payload:
        """Lay the storages out (:func:`plan`) and build the payload; packs beyond the last are put here."""
        places, segments = plan([s.nbytes() for s in self.storages])
        buffers = segments_of(self.storages, places, segments)
        views = Counter(spec[0] for spec in self.specs)
        shared = frozenset(storage for storage, count in views.items() if count > 1)
        return Payload(self.skeleton, self.specs, [tuple(p) for p in places], buffers, self.methods, shared)


def pack(obj: Any) -> tuple[Payload, list[torch.Tensor]]:
    """:func:`split` and :meth:`Packed.payload` in one step; also returns the original tensors in spec order."""
    packed = split(obj)
    return packed.payload(), packed.originals


def split(obj: Any, methods: tuple[str, ...] | None = None) -> Packed:
    """Split ``obj`` into a skeleton and unique storages, validating every tensor; nothing is stored yet.

    ``methods`` (what task mode exposes) defaults to :func:`public_methods`. The result keeps
    the original tensors in spec order (to re-point them if asked).
    """
    if not graph.has_module(obj):
        raise NoModulesError(
            f"{type(obj).__qualname__} holds no torch.nn.Module in its attributes, lists, "
            "tuples or dicts; there are no weights to share"
        )
    table = _Table(root=obj)
    try:
        skeleton = _dump_skeleton(obj, table)
    except UnsupportedTensorError as exc:
        if not isinstance(exc, _Unlocated):
            raise
        raise _located(obj, exc) from exc
    except Exception as exc:
        raise _located(obj, exc) from exc
    methods = public_methods(obj) if methods is None else tuple(methods)
    return Packed(skeleton, table.specs, table.storages, methods, table._alive)
