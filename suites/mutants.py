"""Negative controls: deliberately broken variants of the reference, one per property.

Each mutant follows the contract and claims what the reference claims, but breaks one
property on purpose; a conformance run must fail it with a check whose id starts with
the property named in :data:`MUTANTS`. A suite that passes a mutant cannot see that
defect. Mutants have no task mode (their defects live in actor-mode loading).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import torch

from zcbench.reference import ModelWrapper, __version__
from zcbench.reference.unpacking import storages_from, unpack

from .contract import Capabilities
from .probes import modules_of

#: Strong references that LeaksObject never lets go of.
_LEAKED: list[Any] = []


def _like(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as the same kind of tensor as ``t`` (Parameter or plain, same requires_grad)."""
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def _slots(obj: Any):
    """Every (dict, key) slot holding a parameter or buffer of every module in ``obj``."""
    for _, root in modules_of(obj):
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is not None:
                        yield table, key, t


def _rewrite(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], *, per_occurrence: bool = False) -> Any:
    """A deep copy of ``obj`` with ``fn`` applied to each tensor (the caller's model is left alone).

    Tensors referenced twice get one result, unless ``per_occurrence`` (then the first
    occurrence keeps its tensor and each later one gets ``fn`` of it).
    """
    obj = copy.deepcopy(obj)
    done: dict[int, torch.Tensor] = {}
    for table, key, t in list(_slots(obj)):
        if per_occurrence:
            table[key] = fn(t) if id(t) in done else t
            done[id(t)] = t
        else:
            table[key] = done.setdefault(id(t), fn(t))
    return obj


class _ReferenceMutant:
    """The reference, with a hook before the put and one after the load."""

    name = "mutant"
    version = f"{__version__}+mutant"
    capabilities = Capabilities(cpu=True, cuda=False, task_mode=False, write_policy="cow")

    def prepare(self, obj: Any) -> Any:
        return obj

    def finish(self, model: Any) -> Any:
        return model

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        if mode != "actor":
            raise ValueError(f"{self.name} has no {mode!r} mode; only 'actor'")
        return ModelWrapper.from_model(self.prepare(obj), mode="actor")

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        return self.finish(wrapped.load(device=device))

    def release(self, wrapped: ModelWrapper) -> None:
        """Nothing to do, as for the reference."""


class CopiesOnLoad(_ReferenceMutant):
    """Breaks ``zero_copy``: every actor loads a private copy of every storage (outputs still exact)."""

    name = "mutant-copies-on-load"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        return wrapped.load(device=device, isolation="copy")


class DropsBuffer(_ReferenceMutant):
    """Breaks ``fidelity``: one buffer (a non-persistent one if any, else the last) is gone after load."""

    name = "mutant-drops-buffer"

    def finish(self, model: Any) -> Any:
        for _, root in modules_of(model):
            names = [n for n, _ in root.named_buffers()]
            if not names:
                continue
            persistent = root.state_dict().keys()
            victim = next((n for n in names if n not in persistent), names[-1])
            owner, _, leaf = victim.rpartition(".")
            del root.get_submodule(owner)._buffers[leaf]
            return model
        return model


class UntiesWeights(_ReferenceMutant):
    """Breaks ``fidelity``: a tied weight becomes a separate copy (both copies stored zero-copy)."""

    name = "mutant-unties-weights"

    def prepare(self, obj: Any) -> Any:
        return _rewrite(obj, lambda t: _like(t, t.detach().clone()), per_occurrence=True)


class UpcastsBf16(_ReferenceMutant):
    """Breaks ``fidelity``: bfloat16 tensors are stored and loaded as float32."""

    name = "mutant-upcasts-bf16"

    def prepare(self, obj: Any) -> Any:
        return _rewrite(obj, lambda t: _like(t, t.detach().float()) if t.dtype == torch.bfloat16 else t)


class LosesLayout(_ReferenceMutant):
    """Breaks ``fidelity``: channels_last and non-contiguous tensors are made contiguous."""

    name = "mutant-loses-layout"

    def prepare(self, obj: Any) -> Any:
        return _rewrite(obj, lambda t: t if t.is_contiguous() else _like(t, t.detach().contiguous()))


class LeaksObject(_ReferenceMutant):
    """Breaks ``lifetime``: every wrapper (its ObjectRef) and loaded model is kept for ever."""

    name = "mutant-leaks-object"

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        wrapped = super().wrap(obj, mode)
        _LEAKED.append(wrapped)
        return wrapped

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        model = super().load(wrapped, device)
        _LEAKED.append((wrapped, model))
        return model


class WritesThrough(_ReferenceMutant):
    """Breaks ``isolation``: tensors are built on the shared store pages without copy-on-write.

    An in-place write in one actor changes the weights every actor on the node sees,
    while the implementation still claims ``write_policy="cow"``.
    """

    name = "mutant-writes-through"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        payload = ray.get(wrapped.ref)
        return unpack(payload, storages_from(payload.storages), torch.device(device))


@dataclass(frozen=True)
class Mutant:
    """A mutant's spec and the check-id prefix (property) that must fail it."""

    spec: str
    breaks: str


MUTANTS: dict[str, Mutant] = {
    "mutant-copies-on-load": Mutant("zcbench.suites.mutants:CopiesOnLoad", "zero_copy"),
    "mutant-drops-buffer": Mutant("zcbench.suites.mutants:DropsBuffer", "fidelity"),
    "mutant-unties-weights": Mutant("zcbench.suites.mutants:UntiesWeights", "fidelity"),
    "mutant-upcasts-bf16": Mutant("zcbench.suites.mutants:UpcastsBf16", "fidelity"),
    "mutant-leaks-object": Mutant("zcbench.suites.mutants:LeaksObject", "lifetime"),
    "mutant-writes-through": Mutant("zcbench.suites.mutants:WritesThrough", "isolation"),
    "mutant-loses-layout": Mutant("zcbench.suites.mutants:LosesLayout", "fidelity"),
}
