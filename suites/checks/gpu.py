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

from ..cases import ModelCase, blob_case
from ..compare import first_difference
from ..contract import load_implementation, release
from ..registry import SkipCheck, check

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
        with torch.no_grad():
            out = self.model(*(x.to("cuda") for x in inputs))
        return out.cpu()

    def write_first_weight(self) -> str | None:
        """Add 1 in place to the first parameter; return the error text if the write was refused."""
        try:
            with torch.no_grad():
                next(self.model.parameters()).add_(1)
            torch.cuda.synchronize()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
        return None


def decide_one_copy(model_bytes: int, device_growth: int, allocated: list[int], slack: float = DEVICE_SLACK) -> str | None:
    """None when the GPU holds the model about once; else why not.

    ``device_growth`` is the drop of free device memory across all loads (mem_get_info in
    the driver); ``allocated`` is torch.cuda.memory_allocated in each actor. At most one
    process may own the bytes (a producer that exports them); the rest must map them.
    """
    owners = [i for i, a in enumerate(allocated) if a > SMALL_ALLOC]
    if len(owners) > 1:
        return f"gpu: {len(owners)} of {len(allocated)} actors allocated their own copy ({max(allocated) / MiB:.0f} MiB each at most)"
    if device_growth > slack * model_bytes:
        return (
            f"gpu: device memory grew by {device_growth / MiB:.0f} MiB for {len(allocated)} actors of a "
            f"{model_bytes / MiB:.0f} MiB model ({device_growth / model_bytes:.2f}x > {slack}x)"
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


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        raise SkipCheck("no CUDA device")


def _pool(impl, count: int, wrapped: Any) -> list[Any]:
    options: dict[str, Any] = {"num_gpus": 1 / count, "num_cpus": 0.01}
    if impl.capabilities.worker_env:
        options["runtime_env"] = {"env_vars": dict(impl.capabilities.worker_env)}
    pool = [GpuLoader.options(**options).remote() for _ in range(count)]
    ray.get([a.allocated.remote() for a in pool])  # contexts exist before anything is loaded
    return pool


def _load_all(impl, pool: list[Any], wrapped: Any) -> None:
    # One by one: the first loader may be the producer the others map from.
    for a in pool:
        ray.get(a.load.remote(impl.spec, [wrapped], "cuda"))


def _kill(pool: list[Any]) -> None:
    for a in pool:
        ray.kill(a, no_restart=True)


def _expected(case: ModelCase, original: torch.nn.Module) -> Any:
    inputs = case.inputs()
    with torch.no_grad():
        return original.to("cuda")(*(x.to("cuda") for x in inputs)).cpu()


@check("gpu.one_copy_per_gpu", requires=("cuda",), slow=True)
def check_one_copy_per_gpu(impl) -> dict[str, Any]:
    """4 actors sharing one GPU (0.25 each) load a 256 MiB model; device memory grows by about one model."""
    _need_cuda()
    original = blob_case(MODEL_MIB).build()
    model_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
    wrapped = impl.wrap(original, "actor")
    torch.cuda.init()
    pool = _pool(impl, ACTORS, wrapped)
    try:
        free_before = torch.cuda.mem_get_info()[0]
        _load_all(impl, pool, wrapped)
        free_after = torch.cuda.mem_get_info()[0]
        allocated = ray.get([a.allocated.remote() for a in pool])
    finally:
        _kill(pool)
        release(impl, wrapped)
    growth = free_before - free_after
    problem = decide_one_copy(model_bytes, growth, allocated)
    assert problem is None, problem
    return {"model_bytes": model_bytes, "device_growth": growth, "allocated": allocated}


@check("gpu.outputs", requires=("cuda",))
def check_gpu_outputs(impl) -> None:
    """Actors that load on CUDA compute outputs bit-identical to the original model on the same GPU."""
    _need_cuda()
    case = blob_case(64)
    original = case.build()
    wrapped = impl.wrap(original, "actor")
    expected = _expected(case, case.build())
    pool = _pool(impl, 2, wrapped)
    try:
        _load_all(impl, pool, wrapped)
        outputs = ray.get([a.run.remote(case.inputs()) for a in pool])
    finally:
        _kill(pool)
        release(impl, wrapped)
    for i, got in enumerate(outputs):
        found = first_difference(got, expected, f"actor {i} output")
        assert found is None, f"gpu: {found}"


@check("gpu.isolation", requires=("cuda",))
def check_gpu_isolation(impl) -> dict[str, str]:
    """An in-place write to a CUDA weight in one actor behaves as the declared cuda_write_policy says."""
    _need_cuda()
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


@check("gpu.owner_death", requires=("cuda",))
def check_gpu_owner_death(impl) -> None:
    """Killing the first actor that loaded (the likeliest owner of exported memory) leaves the others exact."""
    _need_cuda()
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
