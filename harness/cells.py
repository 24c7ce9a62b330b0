"""Measure one cell, one round, in the process that owns the Ray driver (see worker.py).

Wrap in the driver (time and clean peak memory growth), load in fresh actors spread
round-robin over the alive nodes (cold: the first on the driver's node, remote cold: the
first on each other node; warm: the next ones), first forward pass, per-actor USS/PSS
after load and after inference, each node's object store bytes, then the Ray Data pipeline.
"""

from __future__ import annotations

import time
from functools import cache
from pathlib import Path
from typing import Any

import ray
import torch

from zcbench.suites import actors, probes
from zcbench.suites.contract import Implementation, release

from . import pipeline_bench
from .matrix import resolve_model

# Metric name -> (unit, which direction is better); compare.py and report.py read this too.
METRICS: dict[str, tuple[str, str]] = {
    "model_bytes": ("B", "none"),
    "wrap_s": ("s", "lower"),
    "wrap_peak_bytes": ("B", "lower"),
    "store_bytes": ("B", "none"),
    "load_cold_s": ("s", "lower"),
    "load_warm_s": ("s", "lower"),
    "load_cold_remote_s": ("s", "lower"),  # first load on a node other than the driver's (multi-node only)
    "first_forward_s": ("s", "lower"),
    "actor_uss_load_bytes": ("B", "lower"),
    "actor_pss_load_bytes": ("B", "lower"),
    "actor_uss_infer_bytes": ("B", "lower"),
    "actor_pss_infer_bytes": ("B", "lower"),
    "actor_store_pss_bytes": ("B", "none"),
    "pool_uss_sum_bytes": ("B", "lower"),
    "pool_pss_sum_bytes": ("B", "lower"),
    "pool_total_bytes": ("B", "lower"),
    "throughput_rows_s": ("rows/s", "higher"),
    "pipeline_rows_s": ("rows/s", "higher"),
    "latency_p50_s": ("s", "lower"),
    "latency_p99_s": ("s", "lower"),
    "pipeline_actors": ("actors", "none"),  # pool actors that processed at least one batch
    "throughput_vs_naive": ("x", "higher"),
    "num_tensors": ("tensors", "none"),  # parameters and buffers (tied ones once per name)
    "num_nodes": ("nodes", "none"),  # alive nodes of the cluster the cell ran on
}
#: Per-node store bytes added by the model: ``store_bytes_node0`` is the driver's node, the others follow by node id.
NODE_METRIC_PREFIX = "store_bytes_node"


def metric_meta(name: str) -> tuple[str, str]:
    """(unit, better) of a metric name, per-node store metrics included."""
    if name.startswith(NODE_METRIC_PREFIX) and name[len(NODE_METRIC_PREFIX):].isdigit():
        return ("B", "none")
    return METRICS.get(name, ("", "none"))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS: a clean peak for this process only.
    Path("/proc/self/clear_refs").write_text("5")


@cache
def _model(name: str) -> tuple[Any, Any]:
    case = resolve_model(name)
    return case, case.build()


def model_bytes(model: Any) -> int:
    """Bytes of the model's unique tensor storages."""
    seen: dict[int, int] = {}
    for _, t in probes.named_tensors(model):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _first_forward(model: Any, method: str, inputs: tuple) -> float:
    torch.set_num_threads(1)
    start = time.perf_counter()
    with torch.no_grad():
        getattr(model, method)(*inputs)
    return time.perf_counter() - start


def node_order(node_ids: list[str], driver_node: str) -> list[str]:
    """The driver's node first, then the others by id: stable across the rounds of one cluster."""
    return sorted(node_ids, key=lambda n: (n != driver_node, n))


def placement(pool: int, nodes: list[str]) -> tuple[list[str], list[str]]:
    """Nodes of the cold actors (the first on each node the pool uses) and of the warm ones.

    The pool is spread round-robin over ``nodes`` (driver's first). At least one warm
    actor is always placed, on a node that already has a cold one (so its load is
    really warm), even when the pool is only cold actors: the caller kills the surplus
    after timing its load.
    """
    cold = nodes[: min(pool, len(nodes))]
    warm = [cold[i % len(cold)] for i in range(len(cold), max(pool, len(cold) + 1))]
    return cold, warm


def per_node_metrics(before: dict[str, int], after: dict[str, int], driver_node: str) -> dict[str, float]:
    """``store_bytes_node<i>`` (bytes each node's store gained, never negative) and ``num_nodes``."""
    out: dict[str, float] = {"num_nodes": len(after)}
    for i, node in enumerate(node_order(list(after), driver_node)):
        out[f"{NODE_METRIC_PREFIX}{i}"] = max(0, after[node] - before.get(node, 0))
    return out


def _median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values))


def measure(impl: Implementation, params: dict[str, Any], rows: int, seed: int, workdir: Path) -> dict[str, Any]:
    """One round of one cell; returns ``{"metrics": {name: value}, "valid": bool, "audit": str}``."""
    case, original = _model(params["model"])
    pool, batch, device = params["pool"], params["batch"], params["device"]
    data = pipeline_bench.make_inputs(case, rows, seed, workdir)
    sample = data.batch(list(range(min(batch, data.rows))))
    m: dict[str, float] = {"model_bytes": model_bytes(original), "num_tensors": sum(1 for _ in probes.named_tensors(original))}

    driver_node = ray.get_runtime_context().get_node_id()
    nodes_before = probes.settled_store_bytes_by_node(quiet_s=1.0, timeout_s=8.0)
    store_before = sum(nodes_before.values())
    _reset_peak()
    rss_before = _status_kib("VmRSS")
    start = time.perf_counter()
    wrapped = impl.wrap(original, "actor")
    m["wrap_s"] = time.perf_counter() - start
    m["wrap_peak_bytes"] = max(0, _status_kib("VmHWM") - rss_before)
    store_wrap = probes.store_bytes() - store_before
    cold_nodes, warm_nodes = placement(pool, node_order(list(nodes_before), driver_node))
    spawned: list[Any] = []
    try:
        # Cold: the first load on each node (its bytes may still have to reach that node's store).
        def spawn_on(nodes: list[str]) -> list[Any]:
            return [a for n in nodes for a in actors.spawn(impl, wrapped, 1, device=device, wait=False, node=n)]

        cold = spawn_on(cold_nodes)
        spawned += cold
        ray.get([a.pid.remote() for a in cold])
        # Warm: the pages are already in the node's store.
        warm = spawn_on(warm_nodes)
        spawned += warm
        reports = ray.get([a.load_report.remote() for a in cold + warm])
        # Cold on the driver's node (the bytes are already in its store); on the other nodes
        # the first load also waits for the bytes to reach that node's store.
        m["load_cold_s"] = reports[0]["load_s"]
        if len(cold) > 1:
            m["load_cold_remote_s"] = _median([r["load_s"] for r in reports[1 : len(cold)]])
        m["load_warm_s"] = _median([r["load_s"] for r in reports[len(cold) :]])
        surplus = len(cold) + len(warm) - pool
        if surplus:
            actors.kill(warm[-surplus:])  # they only timed a warm load; the pool is smaller
            spawned = spawned[:-surplus]
        pool_actors, reports = spawned, reports[:pool]
        m["actor_uss_load_bytes"] = _median([r["after"]["uss"] for r in reports])
        m["actor_pss_load_bytes"] = _median([r["after"]["pss"] for r in reports])
        m["first_forward_s"] = _median(ray.get([a.apply.remote(_first_forward, case.method, sample) for a in pool_actors]))
        mems = ray.get([a.memory.remote() for a in pool_actors])
        nodes_loaded = probes.store_bytes_by_node()
        store_loaded = sum(nodes_loaded.values()) - store_before
        m.update(per_node_metrics(nodes_before, nodes_loaded, driver_node))
        m["actor_uss_infer_bytes"] = _median([x["uss"] for x in mems])
        m["actor_pss_infer_bytes"] = _median([x["pss"] for x in mems])
        m["actor_store_pss_bytes"] = _median([x["store_pss"] for x in mems])
        # Shared store bytes counted once per node; per-actor USS summed (USS is private, so the sum is honest).
        m["store_bytes"] = max(store_wrap, store_loaded, 0)
        m["pool_uss_sum_bytes"] = sum(x["uss"] for x in mems)
        m["pool_pss_sum_bytes"] = sum(x["pss"] for x in mems)
        m["pool_total_bytes"] = m["pool_uss_sum_bytes"] + m["store_bytes"]
    finally:
        actors.kill(spawned)
    try:
        pipe = pipeline_bench.run(impl, wrapped, original, data, pool, batch, device, workdir)
    finally:
        release(impl, wrapped)
    valid, note = pipe.pop("valid"), pipe.pop("audit")
    m.update(pipe)
    return {"metrics": m, "valid": valid, "audit": note}
