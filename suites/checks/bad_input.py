"""Bad input: ``wrap`` (or ``load``) refuses what it cannot share, with a message naming the problem.

Implementation-agnostic: any exception type passes, at wrap time or at load time in a
real Ray actor, as long as something is raised and its message names the culprit. A
check fails when nothing is raised (a wrong or empty model would be silently used) or
when the message does not say what is wrong.
"""

from __future__ import annotations

import threading
from typing import Any

import ray
import torch
from torch import nn

from .. import actors
from ..contract import Implementation, load_implementation, release
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


@ray.remote
class _Loader:
    """Loads a wrapped object through the implementation and reports the error it raised, if any."""

    def __init__(self, impl_spec: str):
        self.impl = load_implementation(impl_spec)

    def try_load(self, wrapped_box: list, device: str) -> str | None:
        try:
            self.impl.load(wrapped_box[0], device)
        except Exception as exc:  # noqa: BLE001 - any exception type is acceptable, its message is checked
            return f"{type(exc).__name__}: {exc}"
        return None


def _last_line(exc: BaseException) -> str:
    # Ray's errors carry the remote traceback (source lines included); its last line is the error itself.
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _load_error(impl: Implementation, wrapped: Any, device: str) -> str | None:
    """The error text of loading ``wrapped`` in a fresh actor, or None if it loaded."""
    options: dict[str, Any] = {"num_cpus": actors.ACTOR_CPUS}
    if impl.capabilities.worker_env:
        options["runtime_env"] = {"env_vars": dict(impl.capabilities.worker_env)}
    loader = _Loader.options(**options).remote(impl.spec)
    try:
        return ray.get(loader.try_load.remote([wrapped], device))
    except ray.exceptions.RayError as exc:  # e.g. the wrapped object cannot even be unpickled there
        return _last_line(exc)
    finally:
        ray.kill(loader, no_restart=True)


def expect_refusal(
    impl: Implementation, obj: Any, needles: tuple[str, ...], problem: str, *, mode: str = "actor", device: str = "cpu"
) -> dict:
    """Wrap ``obj`` and load it in an actor; one of them must raise with a message containing a needle."""
    stage = "wrap"
    try:
        wrapped = impl.wrap(obj, mode)
    except Exception as exc:  # noqa: BLE001 - any exception type is acceptable
        message = f"{type(exc).__name__}: {exc}"
    else:
        stage = "load"
        try:
            message = _load_error(impl, wrapped, device)
        finally:
            release(impl, wrapped)
        assert message is not None, f"{problem}: neither wrap nor load in an actor raised (wrap returned {type(wrapped).__qualname__})"
    lowered = message.lower()
    assert any(n.lower() in lowered for n in needles), (
        f"{problem}: {stage} raised, but its message does not name {' or '.join(map(repr, needles))}: {message[:300]!r}"
    )
    return {"raised_at": stage, "message": message[:300]}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(256, 256)


@check("bad_input.no_modules")
def check_no_modules(impl: Implementation) -> dict:
    """Wrapping a dict or a plain object that holds no module raises, saying there is no module."""
    seen = {}
    for label, obj in (("dict", {"a": 1}), ("plain object", Holder())):
        seen[label] = expect_refusal(impl, obj, ("module",), f"wrap of a {label} without any nn.Module")
    return seen


@check("bad_input.unknown_mode")
def check_unknown_mode(impl: Implementation) -> dict:
    """Wrapping with mode='bogus' raises, naming the mode."""
    return expect_refusal(impl, _model(), ("bogus",), "wrap with mode='bogus'", mode="bogus")


@check("bad_input.unpicklable_attribute")
def check_unpicklable_attribute(impl: Implementation) -> dict:
    """A pipeline attribute holding a threading.Lock makes wrap raise, naming the attribute."""
    return expect_refusal(impl, LockedPipeline(), ("zc_guard_lock",), "pipeline with a threading.Lock in attribute zc_guard_lock")


@check("bad_input.unsupported_tensor")
def check_unsupported_tensor(impl: Implementation) -> dict:
    """A sparse COO buffer is refused (at wrap or load), naming the buffer, instead of loading a wrong model."""
    return expect_refusal(impl, SparseModel(), ("zc_sparse_adjacency",), "model with a sparse COO buffer zc_sparse_adjacency")


@check("bad_input.missing_device")
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
