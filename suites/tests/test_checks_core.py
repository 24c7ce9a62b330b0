"""The zero-copy, fidelity and isolation checks pass on the reference and fail on broken variants.

Each broken implementation is the reference adapter plus one defect applied after
``load`` (or, for isolation, a load straight from the shared store pages). Workers
rebuild them from ``zcbench.suites.tests.test_checks_core:<Name>``, so they live at
module level here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from zcbench.suites.contract import load_implementation
from zcbench.suites.implementations.reference import ReferenceImpl
from zcbench.suites.registry import all_checks

HERE = "zcbench.suites.tests.test_checks_core"


def _swap_parameters(model: Any, make) -> None:
    """Replace each parameter ``p`` (first occurrence) by ``make(name, p)`` unless it returns None."""
    for prefix, module in model.named_modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            new = make(f"{prefix}.{name}".lstrip("."), p)
            if new is not None:
                module._parameters[name] = new


class _Damaged(ReferenceImpl):
    """The reference with one defect applied to the model after loading."""

    name = "broken"

    def load(self, wrapped: Any, device: str = "cpu") -> Any:
        model = super().load(wrapped, device)
        return self.damage(model)

    def damage(self, model: Any) -> Any:
        raise NotImplementedError


class Cloned(_Damaged):
    """Private copies of every tensor: the copy implementation zero-copy checks must catch."""

    def damage(self, model):
        _swap_parameters(model, lambda _, p: nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for module in model.modules():
            for name, b in list(module._buffers.items()):
                if b is not None:
                    module._buffers[name] = b.clone()
        return model


class Reput(_Damaged):
    """Each actor puts its own copy into the object store and loads from it: zero-copy, but N copies."""

    def damage(self, model):
        from zcbench.reference import ModelWrapper

        again = ModelWrapper.from_model(model)
        copy = again.load()
        copy._keep_wrapper = again  # the actor's own object lives as long as the model
        return copy


class CastBf16(_Damaged):
    """bfloat16 tensors come back as float32."""

    def damage(self, model):
        _swap_parameters(
            model, lambda _, p: nn.Parameter(p.detach().float(), requires_grad=False) if p.dtype == torch.bfloat16 else None
        )
        return model


class Untied(_Damaged):
    """Tied weights come back as two separate parameters."""

    def damage(self, model):
        seen: set[int] = set()
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if id(p) in seen:
                    module._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                seen.add(id(p))
        return model


class Contiguous(_Damaged):
    """Conv weights are made contiguous, losing channels_last."""

    def damage(self, model):
        _swap_parameters(
            model, lambda _, p: nn.Parameter(p.detach().contiguous(), requires_grad=p.requires_grad) if p.dim() == 4 else None
        )
        return model


class PlainTensor(_Damaged):
    """The first parameter becomes a plain tensor attribute."""

    def damage(self, model):
        for module in model.modules():
            for name in list(module._parameters):
                t = module._parameters.pop(name)
                object.__setattr__(module, name, t.detach())
                return model
        return model


class InferenceLoad(ReferenceImpl):
    """Loads under ``torch.inference_mode``: weights are inference tensors."""

    name = "broken"

    def load(self, wrapped: Any, device: str = "cpu") -> Any:
        with torch.inference_mode():
            return super().load(wrapped, device)


class SharedPages(ReferenceImpl):
    """Tensors over the object store's shared ``rw-s`` pages, no copy-on-write; still claims 'cow'."""

    name = "broken"

    def load(self, wrapped: Any, device: str = "cpu") -> Any:
        import ray

        from zcbench.reference.unpacking import storages_from, unpack

        payload = ray.get(wrapped.ref)
        return unpack(payload, storages_from(payload.storages), torch.device(device))


class SharedDeclared(SharedPages):
    """The same shared pages, honestly declared ``shared``."""

    capabilities = replace(ReferenceImpl.capabilities, write_policy="shared")


CHECK_IDS = [
    "zero_copy.bytes_in_store",
    "zero_copy.second_actor_private_memory",
    "zero_copy.store_holds_one_copy",
    "fidelity.dtypes",
    "fidelity.random_tensors",
    "fidelity.tied_weights",
    "fidelity.layout",
    "fidelity.metadata",
    "fidelity.autograd",
    "isolation.classify_writes",
    "isolation.declared_policy",
]

#: (check id, broken implementation, text the failure message must contain)
BROKEN = [
    ("zero_copy.bytes_in_store", "Cloned", "outside it:"),
    ("zero_copy.second_actor_private_memory", "Cloned", "private copy"),
    ("zero_copy.store_holds_one_copy", "Reput", "loaded by 3 actors"),
    ("fidelity.dtypes", "CastBf16", "t_bfloat16: dtype torch.float32"),
    ("fidelity.tied_weights", "Untied", "two objects"),
    ("fidelity.layout", "Contiguous", "conv.weight: stride"),
    ("fidelity.metadata", "PlainTensor", "parameters differ"),
    ("fidelity.autograd", "InferenceLoad", "inference tensors"),
    ("isolation.classify_writes", "SharedPages", "corrupts-others"),
    ("isolation.declared_policy", "SharedPages", "declared write_policy 'cow'"),
]


def _checks() -> dict[str, Any]:
    return {c.id: c for c in all_checks()}


@pytest.fixture(scope="module")
def reference():
    return load_implementation("reference")


@pytest.mark.parametrize("check_id", CHECK_IDS)
def test_reference_passes(ray_session, reference, check_id):
    start = time.perf_counter()
    observations = _checks()[check_id].fn(reference)
    print(f"{check_id}: passed in {time.perf_counter() - start:.1f} s: {observations}")


@pytest.mark.parametrize(("check_id", "broken", "message"), BROKEN)
def test_broken_fails(ray_session, check_id, broken, message):
    impl = load_implementation(f"{HERE}:{broken}")
    with pytest.raises(AssertionError) as failure:
        _checks()[check_id].fn(impl)
    text = str(failure.value)
    assert "\n" not in text.strip(), f"failure message spans lines: {text!r}"
    assert message in text, text
    print(f"{check_id} on {broken}: {text}")


def test_declared_shared_is_consistent(ray_session):
    """An implementation that declares 'shared' and is shared passes the consistency check, not the safety check."""
    impl = load_implementation(f"{HERE}:SharedDeclared")
    checks = _checks()
    observations = checks["isolation.declared_policy"].fn(impl)
    assert set(observations["classes"].values()) == {"corrupts-others"}, observations
    with pytest.raises(AssertionError, match="corrupts-others"):
        checks["isolation.classify_writes"].fn(impl)
