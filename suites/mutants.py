"""Deliberately broken implementations: the negative controls that prove each check can fail.

Each mutant follows the contract and claims what the reference claims, but breaks one
property on purpose (its docstring says which). :mod:`.controls` maps every check to
the mutants it must fail and how; a check that passes its mutant cannot see the defect.
Mutants are the reference plus one defect, importable by workers from this module.
"""

from __future__ import annotations

import copy
import ctypes
import os
import time
import types
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch

from zcbench.reference import ModelWrapper, __version__
from zcbench.reference.packing import pack
from zcbench.reference.unpacking import storages_from, unpack

from .contract import Capabilities
from .probes import modules_of, named_tensors

#: Strong references that the leaking mutants never let go of (in whichever process they run).
_LEAKED: list[Any] = []


def _like(t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """``data`` as the same kind of tensor as ``t`` (Parameter or plain, same requires_grad)."""
    if isinstance(t, torch.nn.Parameter):
        return torch.nn.Parameter(data, requires_grad=t.requires_grad)
    return data


def _slots(obj: Any):
    """Every (dict, key, tensor) slot holding a parameter or buffer of every module in ``obj``."""
    for _, root in modules_of(obj):
        for module in root.modules():
            for table in (module._parameters, module._buffers):
                for key, t in table.items():
                    if t is not None:
                        yield table, key, t


def _rewrite(obj: Any, fn, *, per_occurrence: bool = False, in_place: bool = False) -> Any:
    """``obj`` (a deep copy unless ``in_place``) with ``fn`` applied to each tensor.

    Tensors referenced twice get one result, unless ``per_occurrence`` (then the first
    occurrence keeps its tensor and each later one gets ``fn`` of it).
    """
    obj = obj if in_place else copy.deepcopy(obj)
    done: dict[int, torch.Tensor] = {}
    for table, key, t in list(_slots(obj)):
        if per_occurrence:
            table[key] = fn(t) if id(t) in done else t
            done[id(t)] = t
        else:
            table[key] = done.setdefault(id(t), fn(t))
    return obj


class Mutant:
    """The reference through the contract, with a hook before the put and one after the load."""

    name = "mutant"
    version = f"{__version__}+mutant"
    capabilities = Capabilities(cpu=True, cuda=True, task_mode=False, write_policy="cow", cuda_write_policy="shared")

    def prepare(self, obj: Any) -> Any:
        return obj

    def finish(self, model: Any) -> Any:
        return model

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        if mode != "actor" and not self.capabilities.task_mode:
            raise ValueError(f"{self.name} has no {mode!r} mode; only 'actor'")
        return ModelWrapper.from_model(self.prepare(obj), mode=mode)

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        return self.finish(wrapped.load(device=device))

    def release(self, wrapped: ModelWrapper) -> None:
        """Nothing to do, as for the reference."""


# ---------------------------------------------------------------- outputs and fidelity


class PerturbsWeights(Mutant):
    """Breaks ``outputs``: every floating weight is off by 1e-3 (in a private copy; layout and sharing kept)."""

    name = "mutant-perturbs-weights"

    def finish(self, model: Any) -> Any:
        def nudge(t: torch.Tensor) -> torch.Tensor:
            if not (t.dtype.is_floating_point and t.dtype.itemsize >= 2):
                return t
            return _like(t, (t.detach() + 1e-3).to(t.dtype))

        return _rewrite(model, nudge, in_place=True)


class CorruptsBytes(Mutant):
    """Breaks ``fidelity``: the last byte of every storage is flipped (copy-on-write: only this process sees it)."""

    name = "mutant-corrupts-bytes"

    def finish(self, model: Any) -> Any:
        seen = set()
        for _, t in named_tensors(model):
            s = t.untyped_storage()
            if s.nbytes() and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                raw = torch.empty(0, dtype=torch.uint8, device=s.device).set_(s)
                with torch.no_grad():
                    raw[-1] ^= 0xFF
        return model


class DropsBuffer(Mutant):
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


class PlainTensorParameter(Mutant):
    """Breaks ``fidelity``: the first parameter becomes a plain tensor attribute (no longer a Parameter)."""

    name = "mutant-plain-tensor-parameter"

    def finish(self, model: Any) -> Any:
        for _, root in modules_of(model):
            for module in root.modules():
                for name in list(module._parameters):
                    t = module._parameters.pop(name)
                    object.__setattr__(module, name, t.detach())
                    return model
        return model


class UntiesWeights(Mutant):
    """Breaks ``fidelity``: a tied weight becomes a separate copy (both copies stored zero-copy)."""

    name = "mutant-unties-weights"

    def prepare(self, obj: Any) -> Any:
        return _rewrite(obj, lambda t: _like(t, t.detach().clone()), per_occurrence=True)


class UpcastsBf16(Mutant):
    """Breaks ``fidelity``: bfloat16 tensors are stored and loaded as float32."""

    name = "mutant-upcasts-bf16"

    def prepare(self, obj: Any) -> Any:
        return _rewrite(obj, lambda t: _like(t, t.detach().float()) if t.dtype == torch.bfloat16 else t)


class LosesLayout(Mutant):
    """Breaks ``fidelity``: channels_last and non-contiguous tensors are made contiguous."""

    name = "mutant-loses-layout"

    def prepare(self, obj: Any) -> Any:
        return _rewrite(obj, lambda t: t if t.is_contiguous() else _like(t, t.detach().contiguous()))


class TrainsBatchNorm(Mutant):
    """Breaks ``fidelity`` of train/eval: BatchNorm layers come back in training mode (batch statistics, not running ones)."""

    name = "mutant-trains-batchnorm"

    def finish(self, model: Any) -> Any:
        for _, root in modules_of(model):
            for m in root.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.train()
        return model


class DropsLastRow(Mutant):
    """Breaks row accounting: the loaded model's output lacks the batch's last row."""

    name = "mutant-drops-last-row"

    def finish(self, model: Any) -> Any:
        if isinstance(model, torch.nn.Module):
            forward = model.forward
            model.forward = lambda *args, **kwargs: forward(*args, **kwargs)[:-1]
        return model


class InferenceTensors(Mutant):
    """Breaks ``fidelity.autograd``: loads under ``torch.inference_mode``, so weights are inference tensors."""

    name = "mutant-inference-tensors"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        with torch.inference_mode():
            return wrapped.load(device=device)


# ---------------------------------------------------------------- zero-copy


class CopiesOnLoad(Mutant):
    """Breaks ``zero_copy``: every actor loads a private copy of every storage (outputs still exact)."""

    name = "mutant-copies-on-load"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        return wrapped.load(device=device, isolation="copy")


class ReputsPerActor(Mutant):
    """Breaks ``zero_copy.store_holds_one_copy``: each actor puts its own copy into the store and loads that."""

    name = "mutant-reputs-per-actor"

    def finish(self, model: Any) -> Any:
        again = ModelWrapper.from_model(model)
        _LEAKED.append(again)  # this actor's own object lives as long as the process
        return again.load()


class FileBackedWeights(Mutant):
    """Breaks ``zero_copy.store_holds_one_copy``: the weights live in a file on the driver's disk, not in the store.

    Actors map the file (``torch.load(mmap=True)``), so they share pages through the page
    cache and the object store never holds the model: what ``store_holds_one_copy`` must see.
    """

    name = "mutant-file-backed-weights"

    def wrap(self, obj: Any, mode: str = "actor") -> str:
        if mode != "actor":
            raise ValueError(f"{self.name} has no {mode!r} mode; only 'actor'")
        import tempfile

        fd, path = tempfile.mkstemp(prefix="zcbench-mutant-", suffix=".pt")
        os.close(fd)
        torch.save(obj, path)
        return path

    def load(self, wrapped: str, device: str = "cpu") -> Any:
        return torch.load(wrapped, mmap=True, weights_only=False)

    def release(self, wrapped: str) -> None:
        os.unlink(wrapped)


# ---------------------------------------------------------------- isolation


class WritesThrough(Mutant):
    """Breaks ``isolation``: tensors are built on the shared store pages without copy-on-write.

    An in-place write in one actor changes the weights every actor on the node sees,
    while the implementation still claims ``write_policy="cow"``.
    """

    name = "mutant-writes-through"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        payload = ray.get(wrapped.ref)
        return unpack(payload, storages_from(payload.storages), torch.device(device))


class RaisesAfterWrite(Mutant):
    """Breaks ``isolation`` for a declared ``raise`` policy: the write raises only after the writer's bytes changed.

    Inference tensors refuse in-place updates outside inference mode, but torch checks
    after the kernel ran (and ``.data`` writes are not checked at all).
    """

    name = "mutant-raises-after-write"
    capabilities = replace(Mutant.capabilities, write_policy="raise")

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        with torch.inference_mode():
            return wrapped.load(device=device)


# ---------------------------------------------------------------- lifetime


class ForgetsObject(Mutant):
    """Breaks ``lifetime``: tensors point at the store's pages without keeping the object alive.

    Once the driver drops its wrapper, the store may reuse the pages for other objects
    while the actor still computes with them.
    """

    name = "mutant-forgets-object"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        payload = ray.get(wrapped.ref)
        buffers = []
        for s in payload.storages:
            if not s.nbytes:
                buffers.append(np.empty(0, np.uint8))
                continue
            address = s.__array_interface__["data"][0]
            # A view by address alone: nothing references Ray's buffer, so nothing pins the object.
            raw = (ctypes.c_uint8 * s.nbytes).from_address(address)
            buffers.append(np.frombuffer(raw, dtype=np.uint8))
        return unpack(payload, storages_from(buffers), torch.device(device))


class LeaksObject(Mutant):
    """Breaks ``lifetime.release_after_use``: every wrapper (its ObjectRef) and loaded model is kept for ever."""

    name = "mutant-leaks-object"

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        wrapped = super().wrap(obj, mode)
        _LEAKED.append(wrapped)
        return wrapped

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        model = super().load(wrapped, device)
        _LEAKED.append((wrapped, model))
        return model


class LeaksPerLoad(Mutant):
    """Breaks ``lifetime.repeated_cycles``: each load keeps 1 MiB of private memory for ever (a slow service killer)."""

    name = "mutant-leaks-per-load"

    def finish(self, model: Any) -> Any:
        _LEAKED.append(np.ones(2**20, dtype=np.uint8))  # touched, so it is resident
        return model


# ---------------------------------------------------------------- pipelines and task mode


class DeepcopiesContainers(Mutant):
    """Breaks ``pipelines.containers``: modules in a pipeline's dict attributes become separate deep copies."""

    name = "mutant-deepcopies-containers"

    def finish(self, obj: Any) -> Any:
        if not isinstance(obj, torch.nn.Module):
            for name, value in vars(obj).items():
                if isinstance(value, dict):
                    setattr(obj, name, {k: copy.deepcopy(v) for k, v in value.items()})
        return obj


class LosesMethods(Mutant):
    """Breaks ``pipelines.methods``: a pipeline comes back as a bag of its attributes, without its class's methods."""

    name = "mutant-loses-methods"

    def finish(self, obj: Any) -> Any:
        if isinstance(obj, torch.nn.Module):
            return obj
        return types.SimpleNamespace(**vars(obj))


class TaskModeInDriver(Mutant):
    """Breaks ``task_mode.zero_copy``: task mode loads the model in the driver instead of running calls as tasks."""

    name = "mutant-task-mode-in-driver"
    capabilities = replace(Mutant.capabilities, task_mode=True)

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        if wrapped.info.mode == "task":
            return wrapped.as_actor_mode().load(device)
        return super().load(wrapped, device)


class TaskModeCallOnly(Mutant):
    """Breaks ``task_mode.outputs``: the task-mode callable forwards calls but none of the model's public methods."""

    name = "mutant-task-mode-call-only"
    capabilities = replace(Mutant.capabilities, task_mode=True)

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        proxy = wrapped.load(device=device)
        if wrapped.info.mode != "task":
            return proxy

        def call(*args: Any, **kwargs: Any) -> Any:
            return proxy(*args, **kwargs)

        return call


# ---------------------------------------------------------------- bad input


class VagueErrors(Mutant):
    """Breaks ``bad_input``: every refusal says only ``RuntimeError: No module named 'zcbench_vague'``."""

    name = "mutant-vague-errors"

    @staticmethod
    def _vague(fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - the defect under test: the real reason is thrown away
            raise RuntimeError("No module named 'zcbench_vague'") from None

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        return self._vague(super().wrap, obj, mode)

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        return self._vague(super().load, wrapped, device)


# ---------------------------------------------------------------- scale


class QuadraticLoad(Mutant):
    """Breaks ``scale.many_tensors``: loading costs grow with the square of the tensor count (20 ns per pair)."""

    name = "mutant-quadratic-load"

    def finish(self, model: Any) -> Any:
        n = sum(1 for _ in named_tensors(model))
        time.sleep(n * n * 2e-8)
        return model


class DescriptorPerTensor(Mutant):
    """Breaks ``scale.many_tensors``: each loaded tensor keeps an open file descriptor."""

    name = "mutant-descriptor-per-tensor"

    def finish(self, model: Any) -> Any:
        for _ in named_tensors(model):
            _LEAKED.append(os.open("/dev/null", os.O_RDONLY))
        return model


class IgnoresCapacity(Mutant):
    """Breaks ``scale.near_capacity``: a model larger than the store is put anyway (into Ray's disk fallback)."""

    name = "mutant-ignores-capacity"

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        from zcbench.reference.wrapper import WrapperInfo

        payload, _ = pack(obj)
        info = WrapperInfo(type(obj).__qualname__, mode, payload.nbytes, len(payload.specs), len(payload.storages), payload.methods)
        return ModelWrapper(ray.put(payload), info)


# ---------------------------------------------------------------- GPU (need a CUDA device to run)


class ClaimsCudaCow(Mutant):
    """Breaks ``gpu.isolation``: claims copy-on-write on the GPU, where the reference's weights are shared."""

    name = "mutant-claims-cuda-cow"
    capabilities = replace(Mutant.capabilities, cuda_write_policy="cow")


@ray.remote(num_cpus=0)
class _FirstLoader:
    """Remembers the first process that loaded: the stand-in for an owner that lives in an actor."""

    def __init__(self) -> None:
        self.pid: int | None = None

    def claim(self, pid: int) -> int:
        if self.pid is None:
            self.pid = pid
        return self.pid


class OwnedByFirstActor(Mutant):
    """Breaks ``gpu.owner_death``: every later actor's model stops working once the first loading actor is gone."""

    name = "mutant-owned-by-first-actor"

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        model = super().load(wrapped, device)
        registry = _FirstLoader.options(name=f"zcbench-first-loader-{wrapped.ref.hex()}", get_if_exists=True).remote()
        owner = ray.get(registry.claim.remote(os.getpid()))
        if owner == os.getpid():
            _LEAKED.append(registry)  # the registry lives as long as the first loader
            return model
        forward = model.forward

        def guarded(*args: Any, **kwargs: Any) -> Any:
            os.kill(owner, 0)  # ProcessLookupError once the first loader died: its exported memory is gone
            return forward(*args, **kwargs)

        model.forward = guarded
        return model
