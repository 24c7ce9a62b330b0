"""Real Ray actors that load a model through an implementation, and run probes inside.

Every check runs its model here, never in the driver: zero-copy only means something
in the worker processes that a batch job actually uses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import ray

from . import probes
from .contract import Implementation, load_implementation

#: Fraction of a CPU each probe actor asks for, so many fit on a 2-core machine.
ACTOR_CPUS = 0.01


@ray.remote
class LoadedModel:
    """Loads ``wrapped`` with the implementation named by ``impl_spec`` and answers probes."""

    def __init__(self, impl_spec: str, wrapped_box: list, device: str = "cpu"):
        self.impl = load_implementation(impl_spec)
        self.before = probes.memory()
        start = time.perf_counter()
        self.model = self.impl.load(wrapped_box[0], device)
        self.load_s = time.perf_counter() - start
        self.after = probes.memory()

    def pid(self) -> int:
        return os.getpid()

    def load_report(self) -> dict[str, Any]:
        """Load time and memory before and after the load."""
        return {"load_s": self.load_s, "before": self.before.as_dict(), "after": self.after.as_dict()}

    def apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(model, *args, **kwargs)`` here and return its result."""
        return fn(self.model, *args, **kwargs)

    def residency(self, min_bytes: int = 0) -> dict[str, Any]:
        return probes.residency(self.model, min_bytes).as_dict()

    def memory(self) -> dict[str, int]:
        return probes.memory().as_dict()

    def drop(self) -> None:
        """Forget the loaded model (to see memory come back)."""
        self.model = None
        import gc

        gc.collect()


def spawn(
    impl: Implementation,
    wrapped: Any,
    count: int = 1,
    *,
    device: str = "cpu",
    num_cpus: float = ACTOR_CPUS,
    num_gpus: float = 0,
    resources: dict[str, float] | None = None,
    wait: bool = True,
    node: str | None = None,
) -> list[Any]:
    """Start ``count`` actors that each load ``wrapped``; wait until all loaded.

    ``node`` (a node id) places them on that node when it has room (soft affinity: a
    node that cannot host them never hangs the caller).
    """
    env = dict(impl.capabilities.worker_env)
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if env:
        options["runtime_env"] = {"env_vars": env}
    if resources:
        options["resources"] = resources
    if node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    actors = [LoadedModel.options(**options).remote(impl.spec, [wrapped], device) for _ in range(count)]
    if wait:
        ray.get([a.pid.remote() for a in actors])
    return actors


def kill(actors: list[Any]) -> None:
    """Kill actors and do not restart them."""
    for a in actors:
        ray.kill(a, no_restart=True)
