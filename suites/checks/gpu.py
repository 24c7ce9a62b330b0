"""GPU: one copy of the weights per GPU, exact outputs, isolated writes, survival of an owner's death.

Runs only where ``torch.cuda.is_available()`` and the implementation declares ``cuda``.
The decisions are pure functions of measured numbers (tested with fabricated ones), so
the logic is checked even on machines without a GPU.
"""

from __future__ import annotations

import time
from typing import Any

import ray
import torch

from .. import hosts
from ..contract import load_implementation, release
from ..errors import InfrastructureError
from ..equality import first_difference
from ..models import MIXED, ModelCase, blob_case
from ..registry import check

MiB = 2**20
ACTORS = 4
MODEL_MIB = 256
#: Device memory may grow by this factor of the model (allocator rounding, workspaces).
DEVICE_SLACK = 1.25
#: An actor that merely maps another process's weights allocates at most this much itself.
SMALL_ALLOC = 16 * MiB


@ray.remote
class GpuLoader:
    """Initialises CUDA first (so its context is not counted as model memory), then loads on demand."""

    def __init__(self) -> None:
        torch.cuda.init()
        torch.empty(1, device="cuda")  # create the context now
        self.model = None

    def load(self, impl_spec: str, wrapped_box: list, device: str = "cuda") -> None:
        self.model = load_implementation(impl_spec).load(wrapped_box[0], device)
        torch.cuda.synchronize()

    def allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def run(self, inputs: tuple) -> Any:
        from torch.utils._pytree import tree_map

        with torch.no_grad():
            out = self.model(*(x.to("cuda") for x in inputs))
        return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)

    def write_first_weight(self) -> str | None:
        """Add 1 in place to the first parameter; return the error text if the write was refused."""
        try:
            with torch.no_grad():
                next(self.model.parameters()).add_(1)
            torch.cuda.synchronize()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None


def decide_one_copy(
    model_bytes: int, device_growth: int, allocated: list[int], slack: float = DEVICE_SLACK, context_bytes: int = 0
) -> str | None:
    """None when the GPU holds the model about once; else why not.

    ``device_growth`` is the drop of free device memory across all loads (mem_get_info in
    the driver); ``allocated`` is torch.cuda.memory_allocated in each actor. At most one
    process may own the bytes (a producer that exports them); the rest must map them. An
    owner outside the actors needs a CUDA context of its own: ``context_bytes`` (one
    context, measured in the same run) is allowed on top of ``slack`` times the model.
    """
    owners = [i for i, a in enumerate(allocated) if a > SMALL_ALLOC]
    if len(owners) > 1:
        return f"gpu: {len(owners)} of {len(allocated)} actors allocated their own copy ({max(allocated) / MiB:.0f} MiB each at most)"
    bound = slack * model_bytes + context_bytes
    if device_growth > bound:
        return (
            f"gpu: device memory grew by {device_growth / MiB:.0f} MiB for {len(allocated)} actors of a "
            f"{model_bytes / MiB:.0f} MiB model (bound {slack}x the model + one CUDA context of "
            f"{context_bytes / MiB:.0f} MiB = {bound / MiB:.0f} MiB)"
        )
    return None


def classify_write(writer_error: str | None, writer_changed: bool, other_changed: bool) -> str:
    """The write policy an in-place write revealed: ``raise``, ``private`` (cow or copy) or ``shared``."""
    if other_changed:
        return "shared"
    if writer_error is not None:
        return "raise"
    return "private" if writer_changed else "ignored"


def judge_write(declared: str, observed: str) -> str | None:
    """None when the observed write behaviour matches the declared ``write_policy``; else why not."""
    allowed = {"raise": {"raise"}, "cow": {"private"}, "copy": {"private"}, "shared": {"shared"}}
    ok = allowed.get(declared, {"raise", "private"})  # "unknown" must at least not corrupt other actors
    if observed in ok:
        return None
    return f"gpu: an in-place write to a CUDA weight behaved as {observed!r}, declared write_policy {declared!r}"


def judge_survivors(results: list[str | None]) -> str | None:
    """None when every surviving actor still answered exactly; ``results`` holds a problem text or None per actor."""
    bad = [(i, r) for i, r in enumerate(results) if r]
    if not bad:
        return None
    i, why = bad[0]
    return f"gpu: after the first loading actor died, {len(bad)} of {len(results)} survivors failed (actor {i + 1}: {why})"


#: Seconds a GPU actor may take to start (CUDA context) or to load; the device run is short.
GPU_WAIT_S = 90.0


def _pool(impl, count: int, wrapped: Any) -> list[Any]:
    options = hosts.actor_options(impl.capabilities.worker_env, num_gpus=1 / count)
    pool = [GpuLoader.options(**options).remote() for _ in range(count)]
    try:
        ray.get([a.allocated.remote() for a in pool], timeout=GPU_WAIT_S)  # contexts exist before anything is loaded
    except ray.exceptions.GetTimeoutError as exc:
        _kill(pool)
        raise InfrastructureError(f"{count} GPU actors did not start within {GPU_WAIT_S:.0f} s (does Ray see the GPU?)") from exc
    return pool


def _load_all(impl, pool: list[Any], wrapped: Any) -> None:
    # One by one: the first loader may be the producer the others map from.
    for i, a in enumerate(pool):
        try:
            ray.get(a.load.remote(impl.spec, [wrapped], "cuda"), timeout=GPU_WAIT_S)
        except ray.exceptions.GetTimeoutError:
            raise AssertionError(f"gpu: actor {i}'s load on CUDA did not finish within {GPU_WAIT_S:.0f} s") from None


def _kill(pool: list[Any]) -> None:
    for a in pool:
        ray.kill(a, no_restart=True)


def _expected(case: ModelCase, original: torch.nn.Module) -> Any:
    from torch.utils._pytree import tree_map

    inputs = case.inputs()
    with torch.no_grad():
        out = original.to("cuda")(*(x.to("cuda") for x in inputs))
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)


@check("gpu.one_copy_per_gpu", requires=("cuda",), needs=("cuda",), hosts={}, timeout_s=240)
def check_one_copy_per_gpu(impl) -> dict[str, Any]:
    """4 actors sharing one GPU (0.25 each) load a 256 MiB model; device memory grows by about one model."""
    original = blob_case(MODEL_MIB).build()
    model_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
    wrapped = impl.wrap(original, "actor")
    torch.cuda.init()
    torch.cuda.mem_get_info()  # the driver's own context first
    free_empty = torch.cuda.mem_get_info()[0]
    pool = _pool(impl, ACTORS, wrapped)
    try:
        free_before = torch.cuda.mem_get_info()[0]
        context = max(0, (free_empty - free_before) // ACTORS)  # what one process's CUDA context costs here
        _load_all(impl, pool, wrapped)
        free_after = torch.cuda.mem_get_info()[0]
        allocated = ray.get([a.allocated.remote() for a in pool], timeout=GPU_WAIT_S)
    finally:
        _kill(pool)
        release(impl, wrapped)
    growth = free_before - free_after
    problem = decide_one_copy(model_bytes, growth, allocated, context_bytes=context)
    assert problem is None, problem
    return {"model_bytes": model_bytes, "device_growth": growth, "context_bytes": context, "allocated": allocated}


@check("gpu.outputs", requires=("cuda",), needs=("cuda",), hosts={}, timeout_s=240)
def check_gpu_outputs(impl) -> dict[str, Any]:
    """Actors that load on CUDA compute outputs bit-identical to the original on the same GPU (an MLP, and the mixed model: bf16, tied, channels_last)."""
    seen = {}
    for case in (blob_case(64), MIXED):
        original = case.build()
        wrapped = impl.wrap(original, "actor")
        expected = _expected(case, case.build())
        pool = _pool(impl, 2, wrapped)
        try:
            _load_all(impl, pool, wrapped)
            outputs = ray.get([a.run.remote(case.inputs()) for a in pool], timeout=GPU_WAIT_S)
        finally:
            _kill(pool)
            release(impl, wrapped)
        for i, got in enumerate(outputs):
            found = first_difference(got, expected, f"{case.name} actor {i} output")
            assert found is None, f"gpu: {found}"
        seen[case.name] = len(outputs)
    return seen


@check("gpu.isolation", requires=("cuda",), needs=("cuda",), hosts={}, timeout_s=240)
def check_gpu_isolation(impl) -> dict[str, str]:
    """An in-place write to a CUDA weight in one actor behaves as the declared cuda_write_policy says."""
    case = blob_case(64)
    wrapped = impl.wrap(case.build(), "actor")
    expected = _expected(case, case.build())
    pool = _pool(impl, 2, wrapped)
    try:
        _load_all(impl, pool, wrapped)
        error = ray.get(pool[0].write_first_weight.remote())
        writer_out, other_out = ray.get([a.run.remote(case.inputs()) for a in pool])
    finally:
        _kill(pool)
        release(impl, wrapped)
    observed = classify_write(
        error, first_difference(writer_out, expected) is not None, first_difference(other_out, expected) is not None
    )
    problem = judge_write(impl.capabilities.cuda_write_policy, observed)
    assert problem is None, problem
    return {"observed": observed}


@check("gpu.owner_death", requires=("cuda",), needs=("cuda",), hosts={}, timeout_s=240)
def check_gpu_owner_death(impl) -> None:
    """Killing the first actor that loaded (the likeliest owner of exported memory) leaves the others exact."""
    case = blob_case(64)
    wrapped = impl.wrap(case.build(), "actor")
    expected = _expected(case, case.build())
    pool = _pool(impl, 3, wrapped)
    try:
        _load_all(impl, pool, wrapped)
        ray.kill(pool[0], no_restart=True)
        time.sleep(2)  # let the process really exit and the driver notice
        results: list[str | None] = []
        for a in pool[1:]:
            try:
                results.append(first_difference(ray.get(a.run.remote(case.inputs()), timeout=60), expected))
            except Exception as exc:
                results.append(f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        _kill(pool[1:])
        release(impl, wrapped)
    problem = judge_survivors(results)
    assert problem is None, problem
