"""The plug-in contract: how the suites and the harness see an implementation under test.

An implementation is any object with ``name``, ``version``, ``capabilities``, ``wrap``
and ``load`` (subclassing :class:`Implementation` is optional). It is named at run time
as a registered name (``reference``), an installed entry point of the group
``zcbench.implementations``, or ``package.module:factory``; the factory is called with
no arguments and returns the implementation. The checks know implementations only
through this contract, so the reference gets no privilege.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

WritePolicy = Literal["raise", "cow", "copy", "shared", "unknown"]
WRITE_POLICIES = ("raise", "cow", "copy", "shared", "unknown")

ENTRY_POINT_GROUP = "zcbench.implementations"

#: Implementations shipped with adapters; each value is a ``module:factory`` spec.
REGISTRY: dict[str, str] = {
    "reference": "zcbench.suites.implementations.reference:ReferenceImpl",
    "naive": "zcbench.suites.implementations.naive:NaiveCopyImpl",
    "ray-builtin": "zcbench.suites.implementations.ray_builtin:RayBuiltinImpl",
    "ray-zerocopy": "zcbench.suites.implementations.ray_zerocopy:RayZeroCopyImpl",
    "torch-mmap": "zcbench.suites.implementations.torch_mmap:TorchMmapImpl",
    "safetensors": "zcbench.suites.implementations.safetensors_file:SafetensorsImpl",
    "tensorizer": "zcbench.suites.implementations.tensorizer_file:TensorizerImpl",
    "torch-shm": "zcbench.suites.implementations.torch_shm:TorchShmImpl",
}


class ContractError(TypeError):
    """The named implementation cannot be imported or does not follow the contract."""


@dataclass(frozen=True)
class Capabilities:
    """What an implementation claims; checks for an undeclared capability are skipped.

    ``write_policy`` is the declared effect of an in-place write to a loaded weight:
    ``raise`` (refused before any byte changes), ``cow`` (the writer gets a private
    copy), ``copy`` (every actor owns a private copy anyway), ``shared`` (the write is
    visible to every process: weights can be corrupted). ``cuda_write_policy`` is the
    same for weights loaded on a GPU, where copy-on-write pages do not exist; it
    defaults to ``write_policy``. ``store_fallback`` declares (and so documents) that a model
    larger than the node's object store is accepted into Ray's disk-backed fallback file
    instead of being refused.
    """

    cpu: bool = True
    cuda: bool = False
    task_mode: bool = False
    pipelines: bool = True
    multi_node: bool = True
    zero_copy: bool = True
    write_policy: WritePolicy = "unknown"
    cuda_write_policy: WritePolicy | None = None
    store_fallback: bool = False
    worker_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("write_policy", "cuda_write_policy"):
            value = getattr(self, name)
            if value is not None and value not in WRITE_POLICIES:
                raise ContractError(f"{name} {value!r} is not one of {WRITE_POLICIES}")
        if self.cuda_write_policy is None:
            object.__setattr__(self, "cuda_write_policy", self.write_policy)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Implementation(Protocol):
    """The contract. ``wrap`` runs in the driver; ``load`` runs inside a Ray actor or task.

    ``wrap(obj, mode)`` gets an ``nn.Module`` or a pipeline object and returns something
    picklable that Ray can send to actors (``mode`` is ``"actor"`` or ``"task"``).
    ``load(wrapped, device)`` returns the usable model or pipeline (in task mode: a
    callable whose calls run as Ray tasks). ``release(wrapped)`` frees what ``wrap``
    made (files, references); it may do nothing.
    """

    name: str
    version: str
    capabilities: Capabilities

    def wrap(self, obj: Any, mode: str = "actor") -> Any: ...

    def load(self, wrapped: Any, device: str = "cpu") -> Any: ...

    def release(self, wrapped: Any) -> None: ...


_REQUIRED = ("name", "version", "capabilities", "wrap", "load")


def _import_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise ContractError(f"implementation spec {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ContractError(f"implementation spec {spec!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ContractError(f"implementation spec {spec!r}: module {module_name!r} has no {attr!r}") from exc


def resolve_spec(name_or_spec: str) -> str:
    """Turn a registered name or entry-point name into a ``module:factory`` spec."""
    if name_or_spec in REGISTRY:
        return REGISTRY[name_or_spec]
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name_or_spec:
            return ep.value
    if ":" in name_or_spec:
        return name_or_spec
    known = sorted(set(REGISTRY) | {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})
    raise ContractError(
        f"unknown implementation {name_or_spec!r}: not a registered name ({', '.join(known)}) "
        "and not a 'package.module:factory' spec"
    )


def load_implementation(name_or_spec: str) -> Implementation:
    """Import and build the implementation, checking it follows the contract."""
    spec = resolve_spec(name_or_spec)
    factory = _import_factory(spec)
    try:
        impl = factory() if callable(factory) and not _looks_like_impl(factory) else factory
    except Exception as exc:
        raise ContractError(f"implementation {name_or_spec!r}: its factory {spec!r} raised {exc!r}") from exc
    missing = [attr for attr in _REQUIRED if not hasattr(impl, attr)]
    if missing:
        raise ContractError(f"implementation {name_or_spec!r} ({spec}) lacks {', '.join(missing)} of the contract")
    if not isinstance(impl.capabilities, Capabilities):
        raise ContractError(f"implementation {name_or_spec!r}: capabilities must be a zcbench Capabilities")
    if not callable(impl.wrap) or not callable(impl.load):
        raise ContractError(f"implementation {name_or_spec!r}: wrap and load must be callable")
    impl.spec = spec  # so workers can rebuild the same implementation
    return impl


def _looks_like_impl(obj: Any) -> bool:
    return all(hasattr(obj, attr) for attr in _REQUIRED) and not isinstance(obj, type)


def release(impl: Implementation, wrapped: Any) -> None:
    """Call the optional ``release`` of an implementation."""
    fn = getattr(impl, "release", None)
    if callable(fn):
        fn(wrapped)
