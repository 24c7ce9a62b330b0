"""Bad input: ``wrap`` (or ``load``) refuses what it cannot share, with a message naming the problem.

Implementation-agnostic: any exception type passes, at wrap time or at load time in a
real Ray actor, as long as something is raised and its message names the culprit. A
check fails when nothing is raised (a wrong or empty model would be silently used) or
when the message does not say what is wrong.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import ray
import torch
from torch import nn

from .. import hosts, verdicts
from ..contract import Implementation, release
from ..registry import SkipCheck, check


class Holder:
    """A plain object with no module anywhere in it."""

    def __init__(self) -> None:
        self.numbers = [1, 2, 3]
        self.table = {"a": torch.ones(4)}


class LockedPipeline:
    """A pipeline with a module and an attribute that cannot be pickled."""

    def __init__(self) -> None:
        self.encoder = nn.Linear(256, 256)
        self.zc_guard_lock = threading.Lock()


class SparseModel(nn.Module):
    """A model with a sparse COO buffer next to an ordinary dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(256, 256)
        self.register_buffer("zc_sparse_adjacency", torch.eye(256).to_sparse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(torch.sparse.mm(self.zc_sparse_adjacency, x))


def _load_error(impl: Implementation, wrapped: Any, device: str) -> str | None:
    """The error text of loading ``wrapped`` in a Ray actor, or None if it loaded."""
    (host,) = hosts.borrow(impl)
    try:
        ref = host.handle.try_load.remote(impl.spec, [wrapped], device)
    except Exception as exc:  # noqa: BLE001 - the wrapper cannot even be sent to an actor
        return f"sending the wrapper to an actor failed: {verdicts.reason(exc, limit=1000)}"
    try:
        return ray.get(ref, timeout=hosts.LOAD_TIMEOUT_S)
    except ray.exceptions.RayError as exc:  # e.g. the wrapped object cannot even be unpickled there
        return verdicts.reason(exc, limit=1000)


def refusal(impl: Implementation, obj: Any, problem: str, *, mode: str = "actor", device: str = "cpu") -> tuple[str, str]:
    """Wrap ``obj`` and load it in an actor: (stage that raised, its message); fails when neither raised."""
    try:
        wrapped = impl.wrap(obj, mode)
    except Exception as exc:  # noqa: BLE001 - any exception type is acceptable
        return "wrap", f"{type(exc).__name__}: {exc}"
    try:
        message = _load_error(impl, wrapped, device)
    finally:
        release(impl, wrapped)
    assert message is not None, f"{problem}: neither wrap nor load in an actor raised (wrap returned {type(wrapped).__qualname__})"
    return "load", message


def expect_refusal(
    impl: Implementation, obj: Any, needles: tuple[str, ...], problem: str, *, mode: str = "actor", device: str = "cpu"
) -> dict:
    """Wrap ``obj`` and load it in an actor; one of them must raise with a message containing a needle."""
    stage, message = refusal(impl, obj, problem, mode=mode, device=device)
    lowered = message.lower()
    assert any(n.lower() in lowered for n in needles), (
        f"{problem}: {stage} raised, but its message does not name {' or '.join(map(repr, needles))}: {message[:300]!r}"
    )
    return {"raised_at": stage, "message": message[:300]}


#: An import failure's message ("No module named 'x'") mentions a module without saying there is none to share.
_IMPORT_ERROR = re.compile(r"no module named ['\"]", re.I)


def says_no_module(message: str, type_name: str) -> bool:
    """Whether ``message`` says the object holds no ``nn.Module``: naming ``nn.Module``, or naming the object's type and modules."""
    if _IMPORT_ERROR.search(message):
        return False
    lowered = message.lower()
    return "nn.module" in lowered or (type_name.lower() in lowered and "module" in lowered)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(256, 256)


@check("bad_input.no_modules", hosts={"head": 1})
def check_no_modules(impl: Implementation) -> dict:
    """Wrapping a dict or a plain object that holds no module raises, saying there is no module."""
    seen = {}
    for label, obj in (("dict", {"a": 1}), ("plain object", Holder())):
        problem = f"wrap of a {label} ({type(obj).__qualname__}) without any nn.Module"
        stage, message = refusal(impl, obj, problem)
        assert says_no_module(message, type(obj).__qualname__), (
            f"{problem}: {stage} raised, but its message does not say the object holds no nn.Module "
            f"(nor name {type(obj).__qualname__!r} and modules): {message[:300]!r}"
        )
        seen[label] = {"raised_at": stage, "message": message[:300]}
    return seen


@check("bad_input.unknown_mode", hosts={"head": 1})
def check_unknown_mode(impl: Implementation) -> dict:
    """Wrapping with mode='bogus' raises, naming the mode."""
    return expect_refusal(impl, _model(), ("bogus",), "wrap with mode='bogus'", mode="bogus")


@check("bad_input.unpicklable_attribute", hosts={"head": 1})
def check_unpicklable_attribute(impl: Implementation) -> dict:
    """A pipeline attribute holding a threading.Lock makes wrap raise, naming the attribute."""
    return expect_refusal(impl, LockedPipeline(), ("zc_guard_lock",), "pipeline with a threading.Lock in attribute zc_guard_lock")


@check("bad_input.unsupported_tensor", hosts={"head": 1})
def check_unsupported_tensor(impl: Implementation) -> dict:
    """A sparse COO buffer is refused (at wrap or load), naming the buffer, instead of loading a wrong model."""
    return expect_refusal(impl, SparseModel(), ("zc_sparse_adjacency",), "model with a sparse COO buffer zc_sparse_adjacency")


@check("bad_input.missing_device", hosts={"head": 1})
def check_missing_device(impl: Implementation) -> dict:
    """Loading onto cuda:7 in an actor of a machine without it raises, naming the device."""
    if torch.cuda.is_available() and torch.cuda.device_count() >= 8:
        raise SkipCheck("this machine has a cuda:7")
    wrapped = impl.wrap(_model(), "actor")
    try:
        message = _load_error(impl, wrapped, "cuda:7")
    finally:
        release(impl, wrapped)
    assert message is not None, "load(wrapped, device='cuda:7') succeeded in an actor on a machine without cuda:7"
    assert "cuda:7" in message, f"load onto the missing cuda:7 raised, but its message does not name 'cuda:7': {message[:300]!r}"
    return {"message": message[:300]}
