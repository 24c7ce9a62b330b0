"""The reference ``ModelWrapper``: share a model's weights once per node through Ray's object store."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import ray
import torch

from . import cow, gpu
from .errors import (
    DeviceUnavailableError,
    IsolationUnavailableError,
    ModelLostError,
    StoreCapacityError,
    UnknownModeError,
)
from .packing import Payload, pack
from .task_mode import TaskModel
from .unpacking import storages_from, unpack

Mode = Literal["actor", "task"]
Isolation = Literal["auto", "cow", "copy"]
_MODES = ("actor", "task")
_ISOLATIONS = ("auto", "cow", "copy")


@dataclass(frozen=True)
class WrapperInfo:
    """What a wrapper describes, known without touching the weights."""

    name: str
    mode: str
    nbytes: int
    num_tensors: int
    num_storages: int
    methods: tuple[str, ...]


class ModelWrapper:
    """A small, picklable handle to a model or pipeline whose weights live in Ray's object store.

    Create it in the driver with :meth:`from_model`, pass it to actors (for example in
    Ray Data's ``fn_constructor_kwargs``) and call :meth:`load` there: every actor on a
    node then uses the same physical pages, and writes stay private to the writer.
    """

    def __init__(self, ref: ray.ObjectRef, info: WrapperInfo):
        self._ref = ref
        self.info = info

    def __reduce__(self):
        # Only the ObjectRef and a few numbers travel; the weights never enter the pickle.
        return (ModelWrapper, (self._ref, self.info))

    def __repr__(self) -> str:
        i = self.info
        return (
            f"ModelWrapper({i.name}, mode={i.mode!r}, {i.num_tensors} tensors in "
            f"{i.num_storages} storages, {i.nbytes / 2**20:.1f} MiB)"
        )

    @property
    def ref(self) -> ray.ObjectRef:
        """The object-store reference holding the skeleton and the weights."""
        return self._ref

    @classmethod
    def from_model(
        cls,
        model_or_pipeline: Any,
        mode: Mode = "actor",
        *,
        name: str | None = None,
        share_driver_model: bool = False,
    ) -> ModelWrapper:
        """Put the weights of ``model_or_pipeline`` into the object store once.

        ``model_or_pipeline`` is an ``nn.Module`` or any picklable object holding modules
        in attributes, lists, tuples or dicts. ``share_driver_model=True`` also re-points
        the driver's own tensors at (copy-on-write views of) the stored bytes, so the node
        holds exactly one copy; the driver's model must then be on the CPU.
        Raises :class:`StoreCapacityError` before anything is stored if the weights are
        larger than this node's object store.
        """
        if mode not in _MODES:
            raise UnknownModeError(f"unknown mode {mode!r}; expected one of {', '.join(map(repr, _MODES))}")
        payload, originals = pack(model_or_pipeline)
        info = WrapperInfo(
            name=name or type(model_or_pipeline).__qualname__,
            mode=mode,
            nbytes=payload.nbytes,
            num_tensors=len(payload.specs),
            num_storages=len(payload.storages),
            methods=payload.methods,
        )
        _check_fits(info)
        wrapper = cls(ray.put(payload), info)
        if share_driver_model:
            wrapper._repoint(originals)
        return wrapper

    def as_actor_mode(self) -> ModelWrapper:
        """The same shared weights, loaded as a model rather than a task proxy."""
        return ModelWrapper(self._ref, replace(self.info, mode="actor"))

    def load(
        self,
        device: str | torch.device | None = None,
        *,
        isolation: Isolation = "auto",
        timeout_s: float | None = 600.0,
        task_options: dict | None = None,
    ) -> Any:
        """Rebuild the model with its tensors as views of the shared weights.

        In task mode this returns a :class:`TaskModel` whose calls run as Ray tasks.
        ``isolation`` chooses what an in-place write does: ``"cow"`` maps the weights
        copy-on-write (the writer gets a private page; raises if that is impossible
        here), ``"copy"`` loads a private copy, ``"auto"`` is ``"cow"`` falling back
        to ``"copy"`` with a warning. Writes never reach other processes.
        On CUDA (``device=None`` means the GPU Ray gave this actor, if any) every actor on
        a GPU maps one shared copy, writable by convention only: see :mod:`.gpu`.
        """
        if self.info.mode == "task":
            return TaskModel(self, self.info.methods, task_options)
        target = _resolve_device(gpu.default_here() if device is None else device)
        if target.type == "cuda":
            return gpu.load(self, target, isolation, timeout_s)
        if isolation not in _ISOLATIONS:
            raise ValueError(f"unknown isolation {isolation!r}; expected one of {', '.join(_ISOLATIONS)}")
        payload = self._fetch(timeout_s)
        return unpack(payload, storages_from(self._buffers(payload, isolation)), target)

    def _fetch(self, timeout_s: float | None) -> Payload:
        try:
            return ray.get(self._ref, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise ModelLostError(
                f"the weights of {self.info.name} ({self._ref.hex()}) did not arrive within {timeout_s} s"
            ) from exc
        except (ray.exceptions.ObjectLostError, ray.exceptions.ReferenceCountingAssertionError) as exc:
            raise ModelLostError(
                f"the weights of {self.info.name} ({self._ref.hex()}) are no longer in the object store: "
                f"{type(exc).__name__}; keep the wrapper (and the driver that made it) alive while actors load"
            ) from exc

    def _buffers(self, payload: Payload, isolation: str) -> list[np.ndarray]:
        views = None
        if isolation != "copy":
            views = cow.private_views(payload.storages, keep=(self._ref, payload.storages))
        if views is not None:
            return views
        if isolation == "cow":
            raise IsolationUnavailableError(
                "no copy-on-write mapping of the object store is possible in this process "
                "(neither /proc/self/map_files nor the raylet's descriptor can be opened); "
                "use isolation='copy' or 'auto'"
            )
        if isolation == "auto":
            warnings.warn(
                f"copy-on-write mapping unavailable; {self.info.name} is loaded as a private copy "
                f"({self.info.nbytes / 2**20:.1f} MiB) so writes cannot reach other processes",
                RuntimeWarning,
                stacklevel=3,
            )
        return [np.array(s, copy=True) for s in payload.storages]

    def _repoint(self, originals: list[torch.Tensor]) -> None:
        payload = self._fetch(None)
        if any(t.device.type != "cpu" for t in originals):
            raise DeviceUnavailableError("share_driver_model=True needs the driver's model on the CPU")
        storages = storages_from(self._buffers(payload, "auto"))
        with torch.no_grad():
            for t, spec in zip(originals, payload.specs):
                view = torch.empty(0, dtype=spec.dtype).set_(storages[spec.storage], spec.offset, spec.shape, spec.stride)
                t.data = view


def _check_fits(info: WrapperInfo) -> None:
    # Ray would accept a bigger object into a disk-backed fallback file: slow, and every
    # actor's first touch reads from disk. Better to say so before any actor starts.
    if not ray.is_initialized():
        ray.init()  # what ray.put would do anyway
    here = ray.get_runtime_context().get_node_id()
    capacity = next(
        (int(n["Resources"].get("object_store_memory", 0)) for n in ray.nodes() if n["NodeID"] == here and n["Alive"]),
        0,
    )
    if capacity and info.nbytes > capacity:
        need = -(-int(info.nbytes * 1.1) // 2**20)
        raise StoreCapacityError(
            f"{info.name} has {info.nbytes / 2**20:.1f} MiB of weights but this node's object store holds "
            f"{capacity / 2**20:.1f} MiB; start Ray with a larger store (ray.init(object_store_memory={need} * 2**20) "
            f"or ray start --object-store-memory={need * 2**20}) or make the model smaller (e.g. a lower precision)"
        )


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeviceUnavailableError(f"{device!r} is not a device name: {exc}") from exc
    if target.type == "cpu":
        return target
    backend = getattr(torch, target.type, None)
    available = bool(backend and hasattr(backend, "is_available") and backend.is_available())
    count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    if not available or (target.index is not None and target.index >= count):
        raise DeviceUnavailableError(
            f"device {str(target)!r} is not available in this process "
            f"({target.type} devices visible: {count}); load on 'cpu' or schedule the actor where it exists"
        )
    return target
