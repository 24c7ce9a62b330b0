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

from .. import hosts, models, probes
from ..contract import Implementation, release
from ..equality import assert_same
from ..errors import InfrastructureError
from ..registry import check
from ..session import HEAD, current

MiB = 2**20
#: Ray frees objects asynchronously after the last reference is gone.
FREE_TIMEOUT_S = 10.0
#: Seconds to wait for an object the driver let go to leave the store before the fill.
DROP_WAIT_S = 1.0


def _forward(model: Any, inputs: tuple) -> Any:
    with torch.no_grad():
        return model(*inputs)


def _outputs(pool: list, inputs: tuple) -> list:
    return ray.get([a.apply(_forward, inputs) for a in pool])


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


#: Junk put through the store, as a multiple of its capacity: over 1, so every free page is
#: reused (the rest goes to Ray's disk fallback) whatever else the store holds.
FILL = 1.25


def _fill_store(capacity: int, fill: float = FILL, chunk: int = 16 * MiB) -> int:
    """Put ``fill`` times ``capacity`` of junk through the store, the driver keeping it mapped, then let it go.

    Sized from the capacity alone, not from what is free: mapped junk cannot be spilled,
    so to hold it the store must reuse every free page and spill every object no process
    maps; what does not fit goes to Ray's disk fallback. Weights freed or spilled too
    early then read as the junk's 0xA5 pattern. Returns the bytes put.
    """
    junk = np.full(chunk, 0xA5, dtype=np.uint8)
    pinned = [ray.get(ray.put(junk)) for _ in range(-(-int(fill * capacity) // chunk))]
    put = len(pinned) * chunk
    del pinned, junk
    gc.collect()
    return put


def _assert_pressure(before: dict[str, int], capacity: int) -> dict[str, int]:
    """The bytes created and spilled since ``before``; InfrastructureError when less than ``capacity`` passed.

    Too little junk means our own fill did not happen as planned: nothing was judged, so it is
    an error of the suite, never a failure of the implementation.
    """
    after = _store_counters()
    moved = {k: after[k] - before[k] for k in after}
    if moved["created"] < capacity:
        raise InfrastructureError(
            f"only {moved['created'] / MiB:.0f} MiB passed through the {capacity / MiB:.0f} MiB store: "
            "no pressure was made (the suite's fill, not the implementation)"
        )
    return moved


@check("lifetime.driver_drops_wrapper")
def check_driver_drops_wrapper(impl: Implementation) -> dict:
    """Actors keep the original's outputs after the driver drops its wrapper and model and the store is reused."""
    case = models.blob_case(16)
    original = models.build(case)
    nbytes = probes.model_bytes(original)
    inputs = case.inputs()
    expected = case.run(original, inputs)
    wrapped = impl.wrap(original, "actor")
    pool = hosts.load(impl, wrapped, 2)
    try:
        _assert_outputs(pool, inputs, expected, "before the driver dropped the wrapper")
        # The user is done with the wrapper in the driver (release is not called: the
        # actors still use the weights).
        held = probes.store_bytes()
        del wrapped, original
        # Ray frees asynchronously: an object nobody pins must be gone before the fill, or its
        # pages would not be reused. A correct implementation keeps it, and this waits its limit.
        dropped = held - probes.wait_store_bytes(lambda v: held - v >= nbytes, DROP_WAIT_S)
        _assert_outputs(pool, inputs, expected, "after the driver dropped the wrapper")
        # Freed store pages get reused by new objects: weights freed too early now read as junk.
        capacity = current().store_capacity(HEAD)
        counters = _store_counters()
        put = _fill_store(capacity)
        moved = _assert_pressure(counters, capacity)
        _assert_outputs(pool, inputs, expected, f"after the driver dropped the wrapper and {put // MiB} MiB of other objects came and went")
    finally:
        hosts.release(pool)
    return {"dropped_mib": dropped / MiB, "created_mib": moved["created"] // MiB, "spilled_mib": moved["spilled"] // MiB}


@check("lifetime.store_pressure", hosts={"head": 2})
def check_store_pressure(impl: Implementation) -> dict:
    """A 64 MiB model loaded in actors keeps its outputs while more than the store's capacity passes through it."""
    capacity = current().store_capacity(HEAD)
    case = models.blob_case(64)
    original = models.build(case)
    inputs = case.inputs()
    expected = case.run(original, inputs)
    wrapped = impl.wrap(original, "actor")
    pool = hosts.load(impl, wrapped)
    late: list = []
    try:
        _assert_outputs(pool, inputs, expected, "before store pressure")
        # More junk than the store holds, kept mapped by the driver: every object no process maps
        # (an unpinned model) is spilled and its pages reused; the rest goes to Ray's disk fallback.
        counters = _store_counters()
        put = _fill_store(capacity)
        moved = _assert_pressure(counters, capacity)
        _assert_outputs(pool, inputs, expected, f"after {put // MiB} MiB passed through a {capacity // MiB} MiB store")
        # A new actor must still be able to load the (possibly spilled) weights.
        late = hosts.load(impl, wrapped)
        _assert_outputs(late, inputs, expected, "loaded after store pressure")
    finally:
        hosts.release(pool + late)
        release(impl, wrapped)
    return {
        "capacity_mib": capacity // MiB,
        "created_mib": moved["created"] // MiB,
        "spilled_mib": moved["spilled"] // MiB,
    }


@check("lifetime.release_after_use", hosts={"head": 1})
def check_release_after_use(impl: Implementation) -> dict:
    """Once actors are gone, the wrapper dropped and ``release`` called, the object store returns to its size before ``wrap``."""
    slack = 256 * 1024
    case = models.blob_case(32)
    original = models.build(case)
    inputs = case.inputs()
    expected = case.run(original, inputs)
    gc.collect()
    before = probes.store_bytes()
    wrapped = impl.wrap(original, "actor")
    pool = hosts.load(impl, wrapped)
    try:
        _assert_outputs(pool, inputs, expected, "while loaded")
        in_use = probes.store_bytes()
    finally:
        hosts.kill(pool)  # the actors are gone: everything their processes held is released
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


#: Cycles between memory readings (each a collection and an smaps read in the actor and the driver).
READ_EVERY = 3
#: Segments of cycles: a leak must raise the memory floor from each to the next (three rises).
SEGMENTS = 4


def _segment() -> int:
    """Cycles per segment; the bound holds per segment, so a leak of 1/64 of the model per cycle still fails."""
    return 33 if os.environ.get("ZCBENCH_PROFILE") == "zcbench-thorough" else 15  # multiples of READ_EVERY


def _driver_usage() -> dict[str, int]:
    probes.trim_heap()  # as in the host: freed heap pages do not count as a leak
    me = psutil.Process()
    return {"uss": me.memory_full_info().uss, "fds": me.num_fds()}


#: A leak of this fraction of the model per cycle fails the check (16 MiB model: 256 KiB per load).
LEAK_PER_CYCLE = 1 / 64


def leak_bounds(model_bytes: int, cycles: int) -> dict[str, int]:
    """Growth allowed over ``cycles`` wrap/load/release cycles: memory relative to the model, a few descriptors."""
    memory = max(4 * MiB, int(cycles * model_bytes * LEAK_PER_CYCLE))
    return {"driver_uss": memory, "actor_uss": memory, "store": max(MiB, model_bytes // 16), "driver_fds": 4, "actor_fds": 4}


def steady_growth(segments: list[list[dict[str, int]]], keys: tuple[str, ...]) -> dict[str, int]:
    """Memory growth that kept on: for each key, the smallest rise of the floor (lowest reading) from one segment to the next.

    A steady leak raises the floor in every segment. Memory an implementation holds for a
    while and gives back (buffers, thread arenas) moves single readings, not the floor; a
    step up that settles (an allocator arena, a lazily started thread pool, a cache filled
    once) raises it in one or two segments, not in all of them.
    """
    if len(segments) < 3 or not all(segments):
        raise ValueError(f"steady growth needs readings in at least 3 segments, got {[len(s) for s in segments]}")
    floors = [{k: min(r[k] for r in seg) for k in keys} for seg in segments]
    return {k: min(b[k] - a[k] for a, b in zip(floors, floors[1:])) for k in keys}


def judge_leaks(growth: dict[str, int], bounds: dict[str, int], cycles: int, case_name: str) -> None:
    """Fail when any growth exceeds its bound, naming each one (memory in MiB, descriptors as counts)."""
    over = [
        f"{k} +{v / MiB:.1f} MiB (bound {bounds[k] / MiB:.1f})" if "fds" not in k else f"{k} +{v} (bound {bounds[k]})"
        for k, v in growth.items()
        if v > bounds[k]
    ]
    assert not over, f"{cycles} wrap/load/release cycles of {case_name} leaked: {', '.join(over)}"


@check("lifetime.repeated_cycles", hosts={"head": 1})
def check_repeated_cycles(impl: Implementation) -> dict:
    """Repeated wrap -> load in an actor -> release cycles leak no driver or actor memory, store bytes or descriptors.

    The cycles run in four segments, the actor's memory read every few cycles (the driver's
    once per segment: a collection of its heap costs more than a cycle). Memory is judged by the
    smallest rise of its floor from one segment to the next (a steady leak raises it every
    time; buffers held for a while, or a step up that then settles, do not), bounded
    relative to the model; store bytes and descriptors over all cycles.
    """
    k = _segment()
    n = SEGMENTS * k
    case = models.blob_case(16)
    original = models.build(case)
    nbytes = probes.model_bytes(original)
    inputs = case.inputs()
    expected = case.run(original, inputs)
    (host,) = hosts.borrow(impl)

    def cycle(i: int) -> None:
        wrapped = impl.wrap(original, "actor")
        key = f"cycle{i}"
        ray.get(host.handle.load.remote(key, impl.spec, [wrapped], "cpu", measure=False), timeout=hosts.LOAD_TIMEOUT_S)
        got = ray.get(host.handle.apply.remote(key, _forward, inputs))
        ray.get(host.handle.drop.remote(key, measure=False))  # memory is read at each segment's end
        release(impl, wrapped)
        try:
            assert_same(got, expected)
        except AssertionError as exc:
            raise AssertionError(f"cycle {i}: {exc}") from None

    def actor_usage() -> dict[str, int]:
        actor = ray.get(host.handle.usage.remote())
        return {"actor_uss": actor["uss"], "actor_fds": actor["fds"]}

    def driver_usage() -> dict[str, int]:
        driver = _driver_usage()  # a full collection of the driver's heap: read once per segment
        return {"driver_uss": driver["uss"], "driver_fds": driver["fds"]}

    for warm in range(2):  # imports, allocator pools, Ray's first-use caches
        cycle(-1 - warm)
    base_store = probes.store_bytes()
    first = {**driver_usage(), **actor_usage()}
    actor_segments: list[list[dict[str, int]]] = [[] for _ in range(SEGMENTS)]
    driver_segments: list[list[dict[str, int]]] = [[] for _ in range(SEGMENTS)]
    start = time.perf_counter()
    for i in range(1, n + 1):
        cycle(i)
        if i % READ_EVERY == 0:
            actor_segments[(i - 1) // k].append(actor_usage())
        if i % k == 0:
            driver_segments[(i - 1) // k].append(driver_usage())
    elapsed = time.perf_counter() - start
    store = probes.wait_store_bytes(lambda v: v - base_store <= max(MiB, nbytes // 16), FREE_TIMEOUT_S)
    last = {**driver_usage(), **actor_usage()}
    bounds = {**leak_bounds(nbytes, k), **{key: v for key, v in leak_bounds(nbytes, n).items() if key in ("store", "driver_fds", "actor_fds")}}
    growth = {
        **steady_growth(driver_segments, ("driver_uss",)),
        **steady_growth(actor_segments, ("actor_uss",)),
        "store": store - base_store,
        "driver_fds": last["driver_fds"] - first["driver_fds"],
        "actor_fds": last["actor_fds"] - first["actor_fds"],
    }
    judge_leaks(growth, bounds, n, case.name)
    return {
        "cycles": n, "model_bytes": nbytes, "seconds_per_cycle": elapsed / n, "judged_memory_over_cycles": k,
        "segment_floors_mib": {key: [round(min(r[key] for r in seg) / MiB, 2) for seg in segs]
                               for key, segs in (("driver_uss", driver_segments), ("actor_uss", actor_segments))},
        "driver_uss_growth_all": last["driver_uss"] - first["driver_uss"], "actor_uss_growth_all": last["actor_uss"] - first["actor_uss"],
        **{f"{key}_growth": v for key, v in growth.items()},
    }  # fmt: skip
