"""Functions the benchmark runs inside Ray actors.

Ray pickles them by reference, so they live in a module every worker imports by its one
name (``zcbench.harness.inactor``), never in a pytest file that pytest may import as
``harness.bench_load``.
"""

from __future__ import annotations

import time
from typing import Any


def timed_forward(model: Any, method: str, inputs: tuple) -> float:
    """Seconds of one forward pass (``model.method(*inputs)``, no autograd, one thread), run where the model lives."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    with torch.no_grad():
        getattr(model, method)(*inputs)
    return time.perf_counter() - start


#: Timed forward passes of each copy in :func:`steady_vs_private`: with 10, single rounds scattered by +-12 % at
#: 4,000-20,000 tensors; with 40, by +-2 %.
STEADY_REPS = 40


def steady_vs_private(model: Any, method: str, inputs: tuple, reps: int = STEADY_REPS) -> dict[str, float]:
    """Median seconds of a steady forward pass of the loaded ``model`` and of a private copy of it, in this actor.

    The copy (``copy.deepcopy``: every tensor in this process's own memory) differs from the
    loaded model only in where its weights lie. Both run two untimed passes first (every page
    touched), then take turns, the order reversing every pass, so drift of a shared machine and
    the effect of going first hit both alike.
    """
    import copy
    import statistics

    import torch

    from .stats import turn_order

    torch.set_num_threads(1)
    private = copy.deepcopy(model)
    both = {"shared_s": getattr(model, method), "private_s": getattr(private, method)}
    times: dict[str, list[float]] = {name: [] for name in both}
    with torch.no_grad():
        for forward in both.values():
            forward(*inputs)
            forward(*inputs)
        for i in range(reps):
            for name in turn_order(list(both), i):
                start = time.perf_counter()
                both[name](*inputs)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


#: Packages every pool actor has imported before it loads (torch, and zcbench's pipeline with its model zoo).
PRELOADED = ("torch.", "zcbench.")


def imports_model_code(model: Any) -> bool:
    """True when a module class of ``model`` lives outside what a pool actor already imported (transformers, a user's
    package): its first load in a process imports that code, which :func:`load_with_code_imported_s` then leaves out."""
    from torch import nn

    return isinstance(model, nn.Module) and any(not type(m).__module__.startswith(PRELOADED) for m in model.modules())


def load_with_code_imported_s(impl: Any, wrapped: Any, rounds: int = 2) -> float:
    """Median seconds of a load in a fresh actor that has already imported the model's code.

    A fresh actor's first load of a transformers model spends seconds importing
    transformers (whatever the implementation); what a zero-copy load saves is the rest.
    Each round loads once in a fresh actor (the import), drops it, and times a second
    load in the same process.
    """
    import statistics

    import ray
    from zcbench.suites import hosts

    times = []
    for i in range(rounds):
        [first] = hosts.load(impl, wrapped, 1, fresh=True)
        try:
            ray.get(first.host.handle.drop.remote(first.key, measure=False))
            first.host.keys.discard(first.key)
            key = f"{first.key}-again{i}"
            report = ray.get(first.host.handle.load.remote(key, impl.spec, [wrapped], "cpu", measure=False))
            first.host.keys.add(key)
            times.append(report["load_s"])
        finally:
            hosts.release([first])
    return statistics.median(times)


class FirstUse:
    """A new worker process that has imported torch, numpy and zcbench's model zoo, as a probe host has, and done nothing.

    :meth:`measure` times what any load through the object store pays once per process, whatever
    the implementation: the first ``ray.get`` of an object in the store (the process maps the
    store then), and the first tensor made over existing memory, wrapped as a Parameter (torch
    sets up its first operator calls then). Nothing of a model is involved.
    """

    def __init__(self) -> None:
        import sys

        # A worker Ray reused (one that ran tasks before) would not be a new process.
        self.fresh = "torch" not in sys.modules
        import numpy  # noqa: F401 - imported before the timing, as in a probe host
        import torch  # noqa: F401
        import zcbench.suites.models  # noqa: F401

    def measure(self, box: list) -> dict[str, float]:
        """Seconds of the first store ``get`` of ``box[0]`` and of the first tensor plus Parameter in this process."""
        import numpy as np
        import ray
        import torch

        memory = np.zeros(4096, np.uint8)
        start = time.perf_counter()
        ray.get(box[0])
        got = time.perf_counter()
        torch.nn.Parameter(torch.frombuffer(memory, dtype=torch.float32))
        done = time.perf_counter()
        if not self.fresh:
            raise RuntimeError("Ray gave the first-use probe a worker that had imported torch already: not a new process")
        return {"store_get_s": got - start, "tensor_s": done - got}


def first_use_s(stored: Any) -> dict[str, float]:
    """:meth:`FirstUse.measure` in a fresh actor started for it (and killed after); ``stored`` is an ObjectRef in the store."""
    import ray
    from zcbench.suites import hosts

    actor = ray.remote(FirstUse).options(num_cpus=hosts.ACTOR_CPUS).remote()
    try:
        return ray.get(actor.measure.remote([stored]), timeout=hosts.READY_TIMEOUT_S)
    finally:
        ray.kill(actor, no_restart=True)
