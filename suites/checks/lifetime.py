"""Lifetime: loaded weights stay valid while in use and are freed once nobody uses them.

Actors must keep computing the original's outputs after the driver drops its wrapper
and while the object store is under pressure; once actors and wrapper are gone and
``release`` ran, the store's bytes come back, and many wrap/load/release cycles
leak neither driver memory, store bytes nor file descriptors.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import numpy as np
import psutil
import ray
import torch

from .. import actors, probes
from ..cases import blob_case
from ..compare import assert_same
from ..contract import Implementation, load_implementation, release
from ..registry import check

MiB = 2**20
#: Ray frees objects asynchronously after the last reference is gone.
FREE_TIMEOUT_S = 10.0


def _forward(model: Any, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _outputs(pool: list, inputs: tuple) -> list:
    return ray.get([a.apply.remote(_forward, inputs) for a in pool])


def _assert_outputs(pool: list, inputs: tuple, expected: Any, when: str) -> None:
    for i, got in enumerate(_outputs(pool, inputs)):
        try:
            assert_same(got, expected)
        except AssertionError as exc:
            raise AssertionError(f"actor {i} {when}: {exc}") from None


def _store_counters() -> dict[str, int]:
    """Cumulative bytes created in and spilled from every alive node's store (the raylets' counters)."""
    from ray._private.internal_api import node_stats

    total = {"created": 0, "spilled": 0}
    for node in ray.nodes():
        if node.get("Alive"):
            stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False).store_stats
            total["created"] += int(stats.cumulative_created_bytes)
            total["spilled"] += int(stats.spilled_bytes_total)
    return total


def _churn_store(total: int, chunk: int, keep: int) -> int:
    """Put ``total`` bytes of junk into the store in ``chunk``-sized objects, at most ``keep`` alive.

    The junk is a 0xA5 pattern, so store pages reused from weights freed too early read as
    garbage. Returns how many bytes were put.
    """
    junk = np.full(chunk, 0xA5, dtype=np.uint8)
    alive: list[ray.ObjectRef] = []
    put = 0
    while put < total:
        alive.append(ray.put(junk))  # every put is a new object: a fresh copy into the store
        put += chunk
        if len(alive) > keep:
            alive.pop(0)
    del alive, junk
    gc.collect()
    return put


@check("lifetime.driver_drops_wrapper")
def check_driver_drops_wrapper(impl: Implementation) -> dict:
    """Actors keep the original's outputs after the driver drops its wrapper and model and the store is reused."""
    case = blob_case(16)
    original = case.build()
    inputs = case.inputs()
    expected = case.run(original, inputs)
    wrapped = impl.wrap(original, "actor")
    pool = actors.spawn(impl, wrapped, 2)
    try:
        _assert_outputs(pool, inputs, expected, "before the driver dropped the wrapper")
        # The user is done with the wrapper in the driver (release is not called: the
        # actors still use the weights).
        del wrapped, original
        gc.collect()
        time.sleep(0.5)
        _assert_outputs(pool, inputs, expected, "after the driver dropped the wrapper")
        # Freed store pages get reused by new objects: weights freed too early now read as junk.
        put = _churn_store(total=8 * 16 * MiB, chunk=16 * MiB, keep=2)
        _assert_outputs(pool, inputs, expected, f"after the driver dropped the wrapper and {put // MiB} MiB of other objects came and went")
    finally:
        actors.kill(pool)
    return {"churned_mib": put // MiB}


@check("lifetime.store_pressure")
def check_store_pressure(impl: Implementation) -> dict:
    """A 64 MiB model loaded in actors keeps its outputs while more than the store's capacity passes through it."""
    capacity = int(ray.cluster_resources()["object_store_memory"])
    case = blob_case(64)
    original = case.build()
    inputs = case.inputs()
    expected = case.run(original, inputs)
    wrapped = impl.wrap(original, "actor")
    pool = actors.spawn(impl, wrapped, 1)
    late: list = []
    try:
        _assert_outputs(pool, inputs, expected, "before store pressure")
        # Keeping ~85% of the store alive at the peak pushes Ray past its spilling threshold
        # (80%); putting 1.25x the capacity in total forces it to evict and reuse pages.
        chunk = max(capacity // 8, MiB)
        counters = _store_counters()
        put = _churn_store(total=capacity * 5 // 4, chunk=chunk, keep=6)
        after = _store_counters()
        created = after["created"] - counters["created"]
        assert created >= capacity, f"only {created / MiB:.0f} MiB passed through the {capacity / MiB:.0f} MiB store: no pressure was made"
        _assert_outputs(pool, inputs, expected, f"after {put // MiB} MiB passed through a {capacity // MiB} MiB store")
        # A new actor must still be able to load the (possibly spilled) weights.
        late = actors.spawn(impl, wrapped, 1)
        _assert_outputs(late, inputs, expected, "loaded after store pressure")
    finally:
        actors.kill(pool + late)
        release(impl, wrapped)
    return {
        "capacity_mib": capacity // MiB,
        "created_mib": created // MiB,
        "spilled_mib": (after["spilled"] - counters["spilled"]) // MiB,
        "chunk_mib": chunk // MiB,
    }


@check("lifetime.release_after_use")
def check_release_after_use(impl: Implementation) -> dict:
    """Once actors are gone, the wrapper dropped and ``release`` called, the object store returns to its size before ``wrap``."""
    slack = 4 * MiB
    case = blob_case(32)
    original = case.build()
    inputs = case.inputs()
    expected = case.run(original, inputs)
    gc.collect()
    before = probes.settled_store_bytes()
    wrapped = impl.wrap(original, "actor")
    pool = actors.spawn(impl, wrapped, 1)
    try:
        _assert_outputs(pool, inputs, expected, "while loaded")
        in_use = probes.store_bytes()
    finally:
        actors.kill(pool)
    release(impl, wrapped)
    del wrapped, original, pool
    gc.collect()
    after = probes.wait_store_bytes(lambda v: v <= before + slack, FREE_TIMEOUT_S)
    assert after <= before + slack, (
        f"object store holds {(after - before) / MiB:.1f} MiB more than before wrap "
        f"({before / MiB:.1f} -> {after / MiB:.1f} MiB) {FREE_TIMEOUT_S:.0f} s after actors were killed, "
        f"the wrapper dropped and release called: the {case.name} weights were not freed"
    )
    return {"before_mib": before / MiB, "in_use_mib": in_use / MiB, "after_mib": after / MiB}


@ray.remote
class _Cycler:
    """A long-lived actor that loads a wrapped model through the implementation, runs it and drops it."""

    def __init__(self, impl_spec: str):
        self.impl = load_implementation(impl_spec)

    def load_run_drop(self, wrapped_box: list, inputs: tuple) -> Any:
        model = self.impl.load(wrapped_box[0], "cpu")
        out = _forward(model, inputs)
        del model, wrapped_box
        gc.collect()
        return out

    def usage(self) -> dict[str, int]:
        gc.collect()
        return {"uss": probes.memory().uss, "fds": psutil.Process().num_fds()}


def _cycles() -> int:
    return 100 if os.environ.get("ZCBENCH_PROFILE") == "zcbench-thorough" else 10


def _driver_usage() -> dict[str, int]:
    gc.collect()
    me = psutil.Process()
    return {"uss": me.memory_full_info().uss, "fds": me.num_fds()}


@check("lifetime.repeated_cycles")
def check_repeated_cycles(impl: Implementation) -> dict:
    """Repeated wrap -> load in an actor -> release cycles leak no driver or actor memory, store bytes or file descriptors."""
    bounds = {"driver_uss": 32 * MiB, "actor_uss": 32 * MiB, "store": 8 * MiB, "driver_fds": 8, "actor_fds": 8}
    n = _cycles()
    case = blob_case(8)
    original = case.build()
    inputs = case.inputs()
    expected = case.run(original, inputs)
    options: dict[str, Any] = {"num_cpus": actors.ACTOR_CPUS}
    if impl.capabilities.worker_env:
        options["runtime_env"] = {"env_vars": dict(impl.capabilities.worker_env)}
    cycler = _Cycler.options(**options).remote(impl.spec)

    def cycle(i: int) -> None:
        wrapped = impl.wrap(original, "actor")
        got = ray.get(cycler.load_run_drop.remote([wrapped], inputs))
        release(impl, wrapped)
        try:
            assert_same(got, expected)
        except AssertionError as exc:
            raise AssertionError(f"cycle {i}: {exc}") from None

    try:
        cycle(0)  # warm-up: imports, allocator pools, Ray's first-use caches
        base_store = probes.settled_store_bytes()
        base_driver = _driver_usage()
        base_actor = ray.get(cycler.usage.remote())
        start = time.perf_counter()
        for i in range(1, n + 1):
            cycle(i)
        elapsed = time.perf_counter() - start
        store = probes.wait_store_bytes(lambda v: v - base_store <= bounds["store"], FREE_TIMEOUT_S)
        driver = _driver_usage()
        actor = ray.get(cycler.usage.remote())
    finally:
        ray.kill(cycler, no_restart=True)
    growth = {
        "driver_uss": driver["uss"] - base_driver["uss"],
        "actor_uss": actor["uss"] - base_actor["uss"],
        "store": store - base_store,
        "driver_fds": driver["fds"] - base_driver["fds"],
        "actor_fds": actor["fds"] - base_actor["fds"],
    }
    over = [
        f"{k} +{v / MiB:.1f} MiB (bound {bounds[k] / MiB:.0f})" if "fds" not in k else f"{k} +{v} (bound {bounds[k]})"
        for k, v in growth.items()
        if v > bounds[k]
    ]
    assert not over, f"{n} wrap/load/release cycles of {case.name} leaked: {', '.join(over)}"
    return {"cycles": n, "seconds_per_cycle": elapsed / n, **{f"{k}_growth": v for k, v in growth.items()}}
