"""The reference ``ModelWrapper``: share a model's weights once per node through Ray's object store."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields, replace
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
from .packing import Payload, public_methods, split
from .task_mode import TaskModel
from .unpacking import gc_paused, slice_storages, storages_from, unpack_buffers

Mode = Literal["actor", "task"]
Isolation = Literal["auto", "cow", "copy"]
_MODES = ("actor", "task")
_ISOLATIONS = ("auto", "cow", "copy")


@dataclass(frozen=True)
class WrapperInfo:
    """What a wrapper describes, known without touching the weights.

    ``submodules`` lists, for task mode, the top-level modules reachable as
    ``loaded.<name>`` with the methods each exposes.
    """

    name: str
    mode: str
    nbytes: int
    num_tensors: int
    num_storages: int
    methods: tuple[str, ...]
    submodules: tuple[tuple[str, tuple[str, ...]], ...] = ()


class ModelWrapper:
    """A small, picklable handle to a model or pipeline whose weights live in Ray's object store.

    Create it in the driver with :meth:`from_model`, pass it to actors (for example in
    Ray Data's ``fn_constructor_kwargs``) and call :meth:`load` there: every actor on a
    node then uses the same physical pages, and writes stay private to the writer.

    Drop-in for ``ray_zerocopy.ModelWrapper``: ``from_model(obj, mode, model_attr_names,
    method_names)``, :meth:`for_tasks`, :meth:`serialize` / :meth:`deserialize` and
    ``load(_use_fast_load=...)`` are accepted, and in task mode ``loaded.encoder(x)`` runs
    the pipeline's submodule in a task. Differences kept on purpose:

    * Every tensor of the object is shared, wherever it sits (nested objects, lists, dicts),
      not only modules in top-level attributes; ``model_attr_names`` only picks which
      submodules task mode exposes, and a name that is not a module raises ``TypeError``
      (ray_zerocopy skips it silently).
    * Loading keeps the model exactly as it was: train/eval mode per module, Parameters
      with their ``requires_grad``, tied weights as one object, bf16; ray_zerocopy sets
      eval mode and ``requires_grad=False`` and loads under ``inference_mode``.
      ``_use_fast_load`` is accepted and ignored (always exact).
    * Writes stay private to the writer (copy-on-write); in ray_zerocopy they reach every
      process on the node.
    * In task mode ``loaded(x)`` and the pipeline's own methods run *in* one task (the
      pipeline's code runs remotely; submodule calls inside it are local there), and
      ``load()`` returns a :class:`TaskModel`, not an object of the pipeline's class, so
      plain attributes (``loaded.threshold``) are not readable from it.
      ray_zerocopy runs the pipeline's code in the driver and one task per submodule call.
      Task-mode calls run with autograd as the caller's code does; ray_zerocopy wraps them
      in ``torch.no_grad()``.
    * ``serialize()`` returns ``{"ref": ..., <WrapperInfo fields>}``, not ray_zerocopy's
      skeleton and ``model_info``; there is no ``model_refs`` (one object holds the model).
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
        model_attr_names: list[str] | tuple[str, ...] | None = None,
        method_names: tuple[str, ...] | list[str] | None = None,
        *,
        name: str | None = None,
        share_driver_model: bool = False,
    ) -> ModelWrapper:
        """Put the weights of ``model_or_pipeline`` into the object store once.

        ``model_or_pipeline`` is an ``nn.Module`` or any picklable object holding modules
        in attributes, lists, tuples or dicts. ``share_driver_model=True`` also re-points
        the driver's own tensors at (copy-on-write views of) the stored bytes, so the node
        holds exactly one copy; the driver's model must then be on the CPU.
        ``model_attr_names`` / ``method_names`` (as in ray_zerocopy) choose what task mode
        exposes: the top-level submodules reachable as ``loaded.<name>``, and the methods of
        a module (default: every public method of its class, plus ``__call__``).
        Raises :class:`StoreCapacityError` before anything is stored if the weights are
        larger than this node's object store.
        """
        if mode not in _MODES:
            raise UnknownModeError(f"unknown mode {mode!r}; expected one of {', '.join(map(repr, _MODES))}")
        packed = split(model_or_pipeline)
        packed.methods, submodules = _task_surface(model_or_pipeline, model_attr_names, method_names)
        info = WrapperInfo(
            name=name or type(model_or_pipeline).__qualname__,
            mode=mode,
            nbytes=packed.nbytes,
            num_tensors=len(packed.specs),
            num_storages=len(packed.storages),
            methods=packed.methods,
            submodules=submodules,
        )
        if share_driver_model and any(t.device.type != "cpu" for t in packed.originals):
            raise DeviceUnavailableError("share_driver_model=True needs the driver's model on the CPU")
        _check_fits(info)
        wrapper = cls(ray.put(packed.payload()), info)
        if share_driver_model:
            wrapper._repoint(packed.originals)
        return wrapper

    @classmethod
    def for_tasks(cls, model_or_pipeline: Any, method_names: tuple[str, ...] | None = None) -> TaskModel:
        """ray_zerocopy's shortcut: ``from_model(obj, mode="task", method_names=...).load()``."""
        return cls.from_model(model_or_pipeline, mode="task", method_names=method_names).load()

    def serialize(self) -> dict[str, Any]:
        """The wrapper as a plain dict (its ObjectRef and description); :meth:`deserialize` takes it back."""
        return {"ref": self._ref, **asdict(self.info)}

    @classmethod
    def deserialize(cls, ref: ray.ObjectRef | None = None, **info: Any) -> ModelWrapper:
        """The wrapper that :meth:`serialize` described: ``ModelWrapper.deserialize(**state)``."""
        expected = {f.name for f in fields(WrapperInfo)}
        if not isinstance(ref, ray.ObjectRef) or not expected >= set(info):
            raise TypeError(
                f"not a state from zcbench's ModelWrapper.serialize() (keys {sorted(info)}); "
                "a ray_zerocopy state cannot be loaded here: wrap the model again"
            )
        return cls(ref, WrapperInfo(**info))

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
        _use_fast_load: bool = False,
    ) -> Any:
        """Rebuild the model with its tensors as views of the shared weights.

        In task mode this returns a :class:`TaskModel` whose calls run as Ray tasks.
        ``isolation`` chooses what an in-place write does: ``"cow"`` maps the weights
        copy-on-write (the writer gets a private page; raises if that is impossible
        here), ``"copy"`` loads a private copy, ``"auto"`` is ``"cow"`` falling back
        to ``"copy"`` with a warning. Writes never reach other processes.
        On CUDA (``device=None`` means the GPU Ray gave this actor, if any) every actor on
        a GPU maps one shared copy, writable by convention only: see :mod:`.gpu`.
        ``_use_fast_load`` is accepted for ray_zerocopy's callers and changes nothing.
        """
        if self.info.mode == "task":
            return TaskModel(self, self.info.methods, task_options, self.info.submodules)
        target = _resolve_device(gpu.default_here() if device is None else device)
        if target.type != "cuda" and isolation not in _ISOLATIONS:
            raise ValueError(f"unknown isolation {isolation!r}; expected one of {', '.join(_ISOLATIONS)}")
        with gc_paused():
            if target.type == "cuda":
                return gpu.load(self, target, isolation, timeout_s)
            payload = self._fetch(timeout_s)
            buffers, mapped = self._segments(payload, isolation, timeout_s)
            model = unpack_buffers(payload, buffers)
        if mapped:
            # Started last: while the kernel maps pages it holds the process's mmap lock,
            # which the allocations of the rebuild above would otherwise wait for.
            cow.prefault(buffers)
        return model

    def _fetch(self, timeout_s: float | None, refs: list[ray.ObjectRef] | None = None) -> Any:
        """``ray.get`` of the payload (or of ``refs``), with lost or late weights as ModelLostError."""
        try:
            return ray.get(self._ref if refs is None else refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError as exc:
            raise ModelLostError(
                f"the weights of {self.info.name} ({self._ref.hex()}) did not arrive within {timeout_s} s"
            ) from exc
        except (ray.exceptions.ObjectLostError, ray.exceptions.ReferenceCountingAssertionError) as exc:
            raise ModelLostError(
                f"the weights of {self.info.name} ({self._ref.hex()}) are no longer in the object store: "
                f"{type(exc).__name__}; keep the wrapper (and the driver that made it) alive while actors load"
            ) from exc

    def _segments(self, payload: Payload, isolation: str, timeout_s: float | None) -> tuple[list[np.ndarray], bool]:
        """The payload's segments as arrays this process may write, and whether they are
        copy-on-write views of the store (True) or private copies (False)."""
        shared = payload.segment_arrays(lambda refs: self._fetch(timeout_s, refs))
        views = None
        if isolation != "copy":
            views = cow.private_views(shared, keep=(self._ref, payload, shared))
        if views is not None:
            return views, True
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
        # torch's allocator aligns to 64 bytes like the original storages (numpy only to 16).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # only read here
            return [torch.empty(s.nbytes, dtype=torch.uint8).copy_(torch.from_numpy(s)).numpy() for s in shared], False

    def _repoint(self, originals: list[torch.Tensor]) -> None:
        with gc_paused():
            payload = self._fetch(None)
            # No prefault here: the driver already maps these pages once (it wrote them), and
            # mapping them a second time would double its RSS, though not its memory.
            buffers, _ = self._segments(payload, "auto", None)
            storages = slice_storages(storages_from(buffers), payload.places)
        with torch.no_grad():
            for t, (storage, dtype, shape, stride, offset, *_) in zip(originals, payload.specs):
                t.data = torch.empty(0, dtype=dtype).set_(storages[storage], offset, shape, stride)


def _task_surface(
    obj: Any, model_attr_names: list[str] | tuple[str, ...] | None, method_names: tuple[str, ...] | list[str] | None
) -> tuple[tuple[str, ...], tuple[tuple[str, tuple[str, ...]], ...]]:
    """What a task-mode load exposes: the root's methods, and its top-level submodules with theirs.

    As in ray_zerocopy, ``method_names`` restricts the methods of modules (``__call__`` is
    always kept) and a pipeline's own methods stay all available.
    """

    def methods_of(target: Any) -> tuple[str, ...]:
        if method_names is None or not isinstance(target, torch.nn.Module):
            return public_methods(target)
        return tuple(sorted({m for m in method_names if callable(getattr(target, m, None))} | {"__call__"}))

    if model_attr_names is None:
        children = obj._modules if isinstance(obj, torch.nn.Module) else getattr(obj, "__dict__", {})
        names = [k for k, v in children.items() if isinstance(v, torch.nn.Module) and not k.startswith("_")]
    else:
        names = list(model_attr_names)
        for attr in names:
            value = getattr(obj, attr)  # a missing name raises AttributeError, as in ray_zerocopy
            if not isinstance(value, torch.nn.Module):
                raise TypeError(f"model_attr_names: {attr!r} is a {type(value).__qualname__}, not a torch.nn.Module")
    return methods_of(obj), tuple((attr, methods_of(getattr(obj, attr))) for attr in names)


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
