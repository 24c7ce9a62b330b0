"""GPU sharing: one copy of the weights per (node, GPU), mapped into every actor through CUDA IPC.

Design (what ``ModelWrapper.load(device="cuda"...)`` does):

* Device: ``"cuda:N"`` is index N as this process numbers its GPUs; ``"cuda"`` is the
  first GPU Ray assigned to the actor (``ray.get_gpu_ids()`` mapped through
  ``CUDA_VISIBLE_DEVICES``), else the current CUDA device; ``None`` means ``"cuda"``
  when Ray assigned this process a GPU and torch sees CUDA, and the CPU otherwise.
* Owner: one detached Ray actor per (node, physical GPU, wrapper), named from the node
  id, the GPU's UUID and the wrapper's object id, pinned to the node (0 CPU, 0 GPU), and
  restricted to that GPU by ``CUDA_VISIBLE_DEVICES=<UUID>`` so fractional actors
  (``num_gpus=0.25``) and any device numbering meet the same owner. It copies the
  model's segments (see :mod:`.packing`) into ONE device allocation
  (:func:`device_layout`, 256-byte aligned offsets) and exports that one buffer with
  ``reduce_tensor``: one IPC handle, one ref-counter slot and one CUDA event per consumer,
  whatever the tensor count (each handle costs an open of ~0.45 ms, sometimes far more,
  and torch keeps at most ~1,000 IPC events in flight).
* Consumers map the buffer with ``rebuild_cuda_tensor`` on their own device index, slice
  it into segments and storages (slices share the memory) and rebuild views, ties and
  parameters with the CPU path's ``unpack``.
* Lifetime: the owner counts leases (one per ``load``); a lease ends when the mapped
  buffer is garbage (``weakref.finalize``; torch keeps a storage's Python object while
  any slice or tensor uses it) or its process dies (the owner polls consumer pids). The last lease's end frees the storages, calls
  ``torch.cuda.ipc_collect()`` and ends the owner (an owner never leased for
  ``UNUSED_GRACE_S`` ends too). If the owner dies while tensors are
  in use, those tensors point at freed device memory: using them is undefined (CUDA
  errors or garbage), so never kill the owner by hand; a new ``load`` starts a new one.
  ``ModelLostError`` is raised when no live owner can be reached or created.
* Writes: CUDA IPC memory cannot be mapped copy-on-write. ``isolation="auto"`` (or
  ``"shared"``) shares the weights read-only by convention: an in-place write is seen by
  every actor on that GPU. ``isolation="copy"`` gives a private device copy;
  ``isolation="cow"`` raises ``IsolationUnavailableError``.
* ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: the owner strips it from its
  own allocator settings before CUDA starts, so the exported blocks are ordinary
  ``cudaMalloc`` blocks with legacy IPC handles (expandable-segment export needs
  fd passing/``pidfd_getfd`` and differs between torch versions). Consumers may keep it.

Nothing here touches CUDA at import time.
"""

from __future__ import annotations

import gc
import inspect
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import ray
import torch

from .errors import DeviceUnavailableError, IsolationUnavailableError, ModelLostError
from .packing import ALIGNMENT, Payload, layout
from .unpacking import slice_storages, storages_from, unpack

OWNER_NAMESPACE = "zcbench-reference-gpu"
GPU_ISOLATIONS = ("auto", "shared", "copy", "cow")
#: How often the owner checks that its consumers' processes still exist.
REAP_INTERVAL_S = 5.0
#: An owner whose creator died before taking its lease leaves after this long unused.
UNUSED_GRACE_S = 120.0
_ACQUIRE_ATTEMPTS = 3

Handle = tuple  # the argument tuple of torch's rebuild_cuda_tensor, or None for an empty model
Extents = list[tuple[int, int]]  # (byte offset, length) of each segment in the device buffer


# --- pure logic (tested without a GPU) -------------------------------------------------


def expandable_segments_requested(conf: str | None) -> bool:
    """Whether an allocator config string (``PYTORCH_CUDA_ALLOC_CONF``) turns on expandable segments."""
    for key, value in _alloc_items(conf):
        if key == "expandable_segments":
            return value.lower() in ("true", "1")
    return False


def without_expandable_segments(conf: str | None) -> str | None:
    """The config with any ``expandable_segments`` setting removed (None when nothing is left)."""
    kept = [f"{k}:{v}" for k, v in _alloc_items(conf) if k != "expandable_segments"]
    return ",".join(kept) or None


def _alloc_items(conf: str | None) -> list[tuple[str, str]]:
    items = []
    for part in (conf or "").split(","):
        key, _, value = part.strip().partition(":")
        if key:
            items.append((key.strip(), value.strip()))
    return items


def owner_name(node_id: str, gpu_uuid: str, ref_hex: str) -> str:
    """The Ray actor name of the owner of one wrapper's weights on one physical GPU of one node."""
    return f"zc-gpu-owner:{node_id}:{normalize_uuid(gpu_uuid)}:{ref_hex}"


def normalize_uuid(uuid: Any) -> str:
    """A GPU UUID as ``CUDA_VISIBLE_DEVICES`` accepts it (``GPU-…``/``MIG-…``)."""
    text = str(uuid).strip()
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def local_index(gpu_id: int | str, visible: str | None) -> int:
    """This process's CUDA index of the GPU Ray calls ``gpu_id``, given ``CUDA_VISIBLE_DEVICES``."""
    if visible is None or not visible.strip():
        return int(gpu_id)
    order = [v.strip() for v in visible.split(",")]
    if str(gpu_id) not in order:
        raise DeviceUnavailableError(
            f"Ray assigned GPU {gpu_id!r} but CUDA_VISIBLE_DEVICES={visible!r} does not list it"
        )
    return order.index(str(gpu_id))


def resolve_index(
    device: torch.device, *, ray_gpu_ids: Sequence[int | str], visible: str | None, current: Callable[[], int]
) -> int:
    """The CUDA index ``device`` means here: its own index, else Ray's first GPU, else the current device."""
    if device.type != "cuda":
        raise DeviceUnavailableError(f"{str(device)!r} is not a CUDA device")
    if device.index is not None:
        return device.index
    if ray_gpu_ids:
        return local_index(ray_gpu_ids[0], visible)
    return current()


def default_device(ray_gpu_ids: Sequence[int | str], cuda_available: bool) -> str | None:
    """What ``load(device=None)`` means: ``"cuda"`` for an actor Ray gave a GPU (if torch sees CUDA), else None (CPU)."""
    return "cuda" if ray_gpu_ids and cuda_available else None


def check_isolation(isolation: str) -> str:
    """The effective GPU isolation, ``"shared"`` or ``"copy"``; refuses what a GPU cannot do."""
    if isolation not in GPU_ISOLATIONS:
        raise ValueError(f"unknown isolation {isolation!r}; expected one of {', '.join(GPU_ISOLATIONS)}")
    if isolation == "cow":
        raise IsolationUnavailableError(
            "CUDA memory shared through IPC cannot be mapped copy-on-write; use isolation='copy' "
            "for a private device copy or 'auto'/'shared' to share it read-only by convention"
        )
    return "copy" if isolation == "copy" else "shared"


def device_layout(lengths: Sequence[int], alignment: int = ALIGNMENT) -> tuple[Extents, int]:
    """Where each segment goes in the one device buffer: ``(offset, length)`` each, and the buffer's size.

    Offsets are multiples of ``alignment``; storages inside a segment are aligned the same
    way (:data:`.packing.ALIGNMENT`), so every storage is aligned in device memory too.
    """
    offsets, total = layout(lengths, alignment)
    return list(zip(offsets, lengths)), total


def copy_segments(arrays: Sequence[Any], device: torch.device) -> tuple[torch.Tensor, Extents]:
    """One uint8 allocation on ``device`` holding every segment at its :func:`device_layout` offset."""
    extents, total = device_layout([int(a.nbytes) for a in arrays])
    buffer = torch.empty(total, dtype=torch.uint8, device=device)
    for source, (offset, length) in zip(storages_from(arrays), extents):
        if length:
            buffer[offset : offset + length].copy_(torch.empty(0, dtype=torch.uint8).set_(source))
    return buffer, extents


def segment_views(base: torch.UntypedStorage, extents: Extents) -> list[torch.UntypedStorage]:
    """The segments as slices of the mapped buffer (no copy)."""
    return [base[offset : offset + length] for offset, length in extents]


@dataclass
class Leases:
    """The owner's book of consumers: one lease per ``load``, tagged with the consumer's pid."""

    _pids: dict[int, int] = field(default_factory=dict)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    ever_used: bool = False

    def acquire(self, pid: int) -> int:
        """Open a lease for a consumer process; returns its id."""
        lease = next(self._ids)
        self._pids[lease] = pid
        self.ever_used = True
        return lease

    def release(self, lease: int) -> bool:
        """End a lease (again is harmless); True when no lease is left."""
        self._pids.pop(lease, None)
        return self.finished

    def reap(self, is_alive: Callable[[int], bool]) -> list[int]:
        """End the leases of processes that no longer exist; returns the ids ended."""
        dead = [lease for lease, pid in self._pids.items() if not is_alive(pid)]
        for lease in dead:
            del self._pids[lease]
        return dead

    @property
    def finished(self) -> bool:
        """True once leases were handed out and all of them ended."""
        return self.ever_used and not self._pids

    def should_close(self, unused_for_s: float, grace_s: float = UNUSED_GRACE_S) -> bool:
        """True when every lease ended, or none was ever taken within ``grace_s`` of starting."""
        return self.finished or (not self.ever_used and unused_for_s > grace_s)

    def __len__(self) -> int:
        return len(self._pids)


class ConsumerLease:
    """Consumer side of a lease: counts live rebuilt storages and tells the owner when none is left."""

    def __init__(self, release: Callable[[], None], count: int):
        self._release = release
        self._left = count
        self._lock = threading.Lock()
        self.released = False
        if count == 0:
            self._end()

    def drop_one(self) -> None:
        """Called by a storage's finalizer."""
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._end()

    def release_now(self) -> None:
        """End the lease early (the caller promises not to use the tensors any more)."""
        with self._lock:
            self._left = 0
        self._end()

    def _end(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            self._release()
        except Exception:  # noqa: BLE001 - at interpreter exit Ray may be gone; the owner's reaper cleans up
            pass


def watch(storages: Sequence[torch.UntypedStorage], lease: ConsumerLease) -> None:
    """Drop one count of ``lease`` when each storage is really freed (torch keeps one Python object per storage)."""
    for s in storages:
        weakref.finalize(s, lease.drop_one)


class OwnerClient(Protocol):
    """How a consumer talks to the owner (a Ray actor in production, a fake in tests)."""

    def acquire(self, pid: int) -> tuple[int, Handle | None, Extents] | None: ...

    def release(self, lease: int) -> None: ...


def load_shared(
    payload: Payload,
    device: torch.device,
    client: OwnerClient,
    rebuild: Callable[[Handle, torch.device], torch.UntypedStorage],
) -> Any:
    """Rebuild the model from the owner's one exported buffer; the lease ends when nothing uses it."""
    answer = client.acquire(os.getpid())
    if answer is None:
        raise ModelLostError("the GPU owner of these weights is shutting down")
    lease_id, handle, extents = answer
    if len(extents) != len(payload.segments):
        raise ModelLostError(f"the GPU owner exported {len(extents)} segments, the model has {len(payload.segments)}")
    if handle is None:  # a model of empty tensors only: there is no device block to export
        base = torch.UntypedStorage(0, device=device)
        lease = ConsumerLease(lambda: client.release(lease_id), 0)
    else:
        base = rebuild(handle, device)
        lease = ConsumerLease(lambda: client.release(lease_id), 1)
        watch([base], lease)
    storages = slice_storages(segment_views(base, extents), payload.places)
    try:
        return unpack(payload, storages)
    finally:
        del base, storages  # only the model's tensors may keep the lease open


def private_copy(payload: Payload, device: torch.device, arrays: Sequence[Any] | None = None) -> list[torch.UntypedStorage]:
    """The storages copied into one private allocation on ``device`` (views and ties survive: unpack rebuilds them).

    ``arrays`` are the payload's segments if already fetched.
    """
    buffer, extents = copy_segments(payload.segment_arrays() if arrays is None else arrays, device)
    return slice_storages(segment_views(buffer.untyped_storage(), extents), payload.places)


# --- CUDA side (runs only where CUDA exists) -------------------------------------------


def _device_arg() -> int:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return list(inspect.signature(rebuild_cuda_tensor).parameters).index("storage_device")


def export(t: torch.Tensor) -> Handle:
    """The IPC handle of a CUDA uint8 tensor covering one whole allocation."""
    from torch.multiprocessing.reductions import reduce_tensor

    _, args = reduce_tensor(t)
    return tuple(args)


def rebuild(handle: Handle, device: torch.device) -> torch.UntypedStorage:
    """Map the exported buffer into this process on ``device`` (the same physical GPU, our numbering)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    args = list(handle)
    args[_device_arg()] = device.index
    return rebuild_cuda_tensor(*args).untyped_storage()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@ray.remote(num_cpus=0, num_gpus=0, max_restarts=0)
class GpuOwner:
    """Holds one copy of a wrapper's weights on one GPU and lends IPC handles to consumers."""

    def __init__(self, ref_box: list, gpu_uuid: str, reap_interval_s: float = REAP_INTERVAL_S):
        # Before CUDA starts in this process: see exactly the consumers' physical GPU, and
        # export ordinary cudaMalloc blocks (see the module docstring on expandable segments).
        os.environ["CUDA_VISIBLE_DEVICES"] = normalize_uuid(gpu_uuid)
        conf = without_expandable_segments(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
        if conf is None:
            os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        else:
            os.environ["PYTORCH_CUDA_ALLOC_CONF"] = conf
        try:  # also at run time, in case the allocator had already read its settings
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        except (AttributeError, RuntimeError):
            pass
        seen = normalize_uuid(torch.cuda.get_device_properties(0).uuid)
        if seen != normalize_uuid(gpu_uuid):
            raise DeviceUnavailableError(f"GPU owner wanted {normalize_uuid(gpu_uuid)} but CUDA shows {seen}")
        payload = ray.get(ref_box[0])
        self._buffer, self._extents = copy_segments(payload.segment_arrays(), torch.device("cuda", 0))
        torch.cuda.synchronize()
        self.nbytes = self._buffer.numel()
        del payload, ref_box
        self._leases = Leases()
        self._lock = threading.Lock()
        self._closing = False
        threading.Thread(target=self._reaper, args=(reap_interval_s,), daemon=True).start()

    def acquire(self, pid: int) -> tuple[int, Handle | None, Extents] | None:
        with self._lock:
            if self._closing or self._buffer is None:
                return None
            # A fresh export per consumer: each export carries one count of torch's IPC
            # ref-counter, which that consumer's rebuild releases (once) when it frees it.
            handle = export(self._buffer) if self.nbytes else None
            return self._leases.acquire(pid), handle, self._extents

    def release(self, lease: int) -> None:
        with self._lock:
            finished = self._leases.release(lease)
        if finished:
            self._close()

    def stats(self) -> dict[str, int]:
        """Bytes this owner holds on its GPU, what its allocator counts, and its open leases."""
        return {
            "nbytes": self.nbytes,
            "allocated": torch.cuda.memory_allocated(0),
            "leases": len(self._leases),
            "pid": os.getpid(),
        }

    def _reaper(self, interval: float) -> None:
        started = time.monotonic()
        while True:
            time.sleep(interval)
            with self._lock:
                self._leases.reap(_pid_alive)
                done = self._leases.should_close(time.monotonic() - started)
            if done:
                self._close(started)
                return

    def _close(self, started: float | None = None) -> None:
        with self._lock:
            unused_for = time.monotonic() - started if started is not None else 0.0
            if self._closing or not self._leases.should_close(unused_for):
                return
            self._closing = True
            self._buffer = None
        gc.collect()
        torch.cuda.ipc_collect()
        try:
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
        except Exception:  # noqa: BLE001 - leaving is what matters; the name is freed either way
            os._exit(0)


class _RayOwner:
    """An :class:`OwnerClient` over the named owner actor; maps an owner's death to ModelLostError."""

    def __init__(self, handle: Any, timeout_s: float | None):
        self._handle = handle
        self._timeout = timeout_s

    def acquire(self, pid: int) -> tuple[int, Handle | None, Extents] | None:
        try:
            return ray.get(self._handle.acquire.remote(pid), timeout=self._timeout)
        except ray.exceptions.GetTimeoutError as exc:
            raise ModelLostError(f"the GPU owner did not answer within {self._timeout} s") from exc
        except ray.exceptions.RayActorError as exc:
            raise ModelLostError(f"the GPU owner of these weights died: {exc}") from exc

    def release(self, lease: int) -> None:
        self._handle.release.remote(lease)


def _owner_handle(ref: ray.ObjectRef, index: int) -> Any:
    node = ray.get_runtime_context().get_node_id()
    uuid = normalize_uuid(torch.cuda.get_device_properties(index).uuid)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return GpuOwner.options(
        name=owner_name(node, uuid, ref.hex()),
        namespace=OWNER_NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
    ).remote([ref], uuid)


def resolve_here(device: torch.device) -> torch.device:
    """``device`` with the index this process should use (see :func:`resolve_index`)."""
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    index = resolve_index(
        device, ray_gpu_ids=ids, visible=os.environ.get("CUDA_VISIBLE_DEVICES"), current=torch.cuda.current_device
    )
    return torch.device("cuda", index)


def default_here() -> str | None:
    """:func:`default_device` for this process."""
    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    return default_device(ids, bool(ids) and torch.cuda.is_available())


def load(wrapper: Any, device: torch.device, isolation: str, timeout_s: float | None) -> Any:
    """``ModelWrapper.load`` on a CUDA device: map the owner's single copy, or make a private one."""
    mode = check_isolation(isolation)
    target = resolve_here(device)
    payload = wrapper._fetch(timeout_s)
    if mode == "copy":
        arrays = payload.segment_arrays(lambda refs: wrapper._fetch(timeout_s, refs))
        return unpack(payload, private_copy(payload, target, arrays))
    last: ModelLostError | None = None
    for attempt in range(_ACQUIRE_ATTEMPTS):
        # A new owner replaces one that is shutting down (its last lease just ended) or died.
        try:
            return load_shared(payload, target, _RayOwner(_owner_handle(wrapper.ref, target.index), timeout_s), rebuild)
        except ModelLostError as exc:  # includes an owner that failed to start (weights lost)
            last = exc
            time.sleep(0.5 * (attempt + 1))
    raise ModelLostError(
        f"no live GPU owner for {wrapper.info.name} on cuda:{target.index} after {attempt + 1} attempts: {last}"
    ) from last
