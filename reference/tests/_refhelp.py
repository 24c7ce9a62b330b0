"""Shared pieces of the reference's tests: a loading actor, test models, and tensor fingerprints.

The module is pickled by value (see :func:`register`), so Ray workers need not import
the test folder.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

import ray
import torch
from ray import cloudpickle
from torch import nn

from zcbench.suites import probes

MiB = 2**20
#: Tiny CPU share per actor so several fit on a 2-core machine.
CPUS = 0.01


def register(module_name: str) -> None:
    """Pickle ``module_name`` (and this module) by value so workers can run its functions."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    if module_name != __name__:
        cloudpickle.register_pickle_by_value(sys.modules[module_name])


@ray.remote(num_cpus=CPUS)
class Holder:
    """Loads a ``ModelWrapper`` on request and runs functions on the loaded model."""

    def __init__(self):
        self.wrapper = None
        self.model = None

    def load(self, wrapper_box: list, **load_kwargs: Any) -> dict[str, Any]:
        """Load, then touch every weight byte so USS/PSS reflect the mapped pages."""
        self.drop()
        self.wrapper = wrapper_box[0]
        before = probes.memory()
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            self.model = self.wrapper.load(**load_kwargs)
        load_s = time.perf_counter() - start
        touch(self.model)
        after = probes.memory()
        caught = [f"{w.category.__name__}: {w.message}" for w in seen]
        return {"load_s": load_s, "before": before.as_dict(), "after": after.as_dict(), "warnings": caught}

    def load_only(self, wrapper_box: list, **load_kwargs: Any) -> dict[str, Any]:
        """Load without touching the weights (to see what the load itself maps and allocates)."""
        self.drop()
        self.wrapper = wrapper_box[0]
        before = probes.memory()
        start = time.perf_counter()
        self.model = self.wrapper.load(**load_kwargs)
        load_s = time.perf_counter() - start
        return {"load_s": load_s, "before": before.as_dict(), "after": probes.memory().as_dict()}

    def apply(self, fn, *args: Any, **kwargs: Any) -> Any:
        return fn(self.model, *args, **kwargs)

    def drop_wrapper(self) -> None:
        """Forget the wrapper (its ObjectRef) so only the loaded model keeps the weights."""
        self.wrapper = None
        gc.collect()

    def drop(self) -> None:
        """Forget the model and the wrapper."""
        self.wrapper = self.model = None
        gc.collect()

    def pid(self) -> int:
        return os.getpid()


_pool: list[Any] = []


def pool(count: int) -> list[Any]:
    """``count`` long-lived holders, shared by every test (starting a worker costs seconds here)."""
    while len(_pool) < count:
        _pool.append(Holder.remote())
    return _pool[:count]


def spawn(wrapper: Any, count: int = 1, env: dict[str, str] | None = None, **load_kwargs: Any) -> list[Any]:
    """Holders that each loaded ``wrapper`` (one after the other); fresh ones when ``env`` is set."""
    return spawn_reports(wrapper, count, env, **load_kwargs)[0]


def spawn_reports(
    wrapper: Any, count: int = 1, env: dict[str, str] | None = None, **load_kwargs: Any
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Like :func:`spawn`, also returning each holder's load report (time, memory, warnings)."""
    if env:
        holders = [Holder.options(runtime_env={"env_vars": env}).remote() for _ in range(count)]
    else:
        holders = pool(count)
    reports = []
    try:
        for holder in holders:
            reports.append(ray.get(holder.load.remote([wrapper], **load_kwargs)))
    except Exception:
        kill(holders)
        raise
    return holders, reports


def kill(holders: list[Any]) -> None:
    """Drop pooled holders' models; kill the others."""
    for holder in holders:
        if any(holder is p for p in _pool):
            ray.get(holder.drop.remote())
        else:
            ray.kill(holder, no_restart=True)


def touch(obj: Any) -> int:
    """Read every byte of every CPU storage (faults all pages in, copies nothing)."""
    total, seen = 0, set()
    for _, t in probes.named_tensors(obj):
        storage = t.untyped_storage()
        if t.device.type != "cpu" or not storage.nbytes() or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += int(torch.empty(0, dtype=torch.uint8).set_(storage).sum())
    return total


def fingerprint(t: torch.Tensor) -> dict[str, Any]:
    """Everything that must survive a load: kind, dtype, layout, flags and exact bytes."""
    data = t.detach()
    raw = data.contiguous().view(torch.uint8) if data.numel() else torch.empty(0, dtype=torch.uint8)
    return {
        "kind": type(t).__name__,
        "dtype": str(t.dtype),
        "shape": tuple(t.shape),
        "stride": tuple(t.stride()),
        "offset": t.storage_offset(),
        "requires_grad": t.requires_grad,
        "inference": t.is_inference(),
        "sha256": hashlib.sha256(raw.numpy().tobytes()).hexdigest(),
    }


def fingerprints(obj: Any) -> dict[str, dict[str, Any]]:
    """Fingerprint of every parameter and buffer reachable from ``obj``, by path."""
    return {name: fingerprint(t) for name, t in probes.named_tensors(obj)}


def weight_digest(model: Any) -> str:
    """One hash over all weight bytes, to see whether anything changed."""
    h = hashlib.sha256()
    for name, t in sorted(probes.named_tensors(model), key=lambda kv: kv[0]):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settled_store_bytes(quiet_s: float = 2.0, timeout_s: float = 15.0) -> int:
    """Bytes in all object stores once no value has moved for ``quiet_s`` (frees reach the raylets late)."""
    gc.collect()
    deadline = time.monotonic() + timeout_s
    last, quiet_since = probes.store_bytes(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        time.sleep(0.25)
        now = probes.store_bytes()
        if now != last:
            last, quiet_since = now, time.monotonic()
    return last


def residency(model: Any, min_bytes: int = 0) -> dict[str, Any]:
    return probes.residency(model, min_bytes).as_dict()


def memory(_model: Any = None) -> dict[str, int]:
    return probes.memory().as_dict()


class DTypes(nn.Module):
    """Layers in float32, bfloat16 and float16; forward keeps each in its own dtype."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.f32 = nn.Linear(width, width)
        self.bf16 = nn.Linear(width, width).to(torch.bfloat16)
        self.f16 = nn.Linear(width, width).to(torch.float16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.f32(x)
        b = self.bf16(a.to(torch.bfloat16))
        c = self.f16(a.to(torch.float16))
        return {"f32": a, "bf16": b, "f16": c}


def build_dtypes() -> nn.Module:
    torch.manual_seed(3)
    return DTypes().eval()


def run(model: Any, *inputs: Any) -> Any:
    """Call the model without an autograd graph (as a batch job does)."""
    with torch.no_grad():
        return model(*inputs)


@contextlib.contextmanager
def like_actor() -> Iterator[None]:
    """Compute with one thread, as a Ray worker with a CPU fraction does (OMP_NUM_THREADS=1).

    BLAS may sum in another order with another thread count, so bit-exact expectations
    must be computed under the same setting as the actors.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
