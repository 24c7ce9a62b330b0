"""The benchmark's metric names: unit, which direction is better, and what each one means.

One table for the measuring code (cells.py), the statistics (bench.py), the comparison
(compare.py), the report and the schema's description, so a name means the same thing
everywhere.
"""

from __future__ import annotations

from typing import NamedTuple


class Metric(NamedTuple):
    """Unit, direction (``lower``/``higher`` is better, or ``none``) and a one-line meaning."""

    unit: str
    better: str
    meaning: str


METRICS: dict[str, Metric] = {
    # The model and the driver
    "model_bytes": Metric("B", "none", "bytes of the model's unique tensor storages (probes.model_bytes)"),
    "num_tensors": Metric("tensors", "none", "parameters and buffers of the model (tied ones once per name)"),
    "wrap_s": Metric("s", "lower", "wrap(model) in the driver"),
    "wrap_peak_bytes": Metric("B", "lower", "driver's clean peak memory growth during wrap (malloc_trim, clear_refs, then VmHWM); "
                              "store pages the driver still maps from an earlier round do not show again, so the largest round is the figure"),
    "wrap_peak_ratio": Metric("x", "lower", "wrap_peak_bytes / model_bytes"),
    "metadata_floor_s": Metric("s", "none", "building num_tensors views of one buffer plus their Parameters, in the driver: the floor of any load"),
    # The object stores
    "store_bytes": Metric("B", "none", "bytes all object stores gained (wrap and the pool's loads)"),
    "num_nodes": Metric("nodes", "none", "alive nodes of the cluster the cell ran on"),
    # Loads in the pool actors (Ray Data's own fresh processes, loading concurrently)
    "load_cold_s": Metric("s", "lower", "the first load on the driver's node"),
    "load_cold_remote_s": Metric("s", "lower", "median of the first load on each other node (multi-node only)"),
    "load_warm_s": Metric("s", "lower", "median of the pool's other loads"),
    "load_imported_s": Metric("s", "lower", "load in a fresh actor that already imported the model's code (its second load), for models whose classes live outside torch"),
    "in_store_fraction": Metric("x", "none", "smallest fraction of weight bytes lying in the object store, over the pool"),
    # Memory of one actor
    "empty_uss_bytes": Metric("B", "lower", "median private memory (USS) of a pool actor before any weight"),
    "actor_uss_load_bytes": Metric("B", "lower", "median USS of a pool actor after load"),
    "actor_pss_load_bytes": Metric("B", "lower", "median PSS of a pool actor after load"),
    "actor_uss_infer_bytes": Metric("B", "lower", "median USS of a pool actor after inference (its last in-actor sample)"),
    "actor_model_uss_bytes": Metric("B", "lower", "median of (USS after inference - USS empty): private bytes the model costs one actor"),
    # Memory of the pool (every shared page counted once; never a sum of RSS)
    "pool_private_bytes": Metric("B", "lower", "sum of the pool actors' private memory after inference (anonymous pages, copy-on-write copies)"),
    "pool_shared_bytes": Metric("B", "lower", "resident pages of every file the pool actors map (the store's, a checkpoint's, libraries), each file counted once"),
    "pool_total_bytes": Metric("B", "lower", "pool_private_bytes + pool_shared_bytes (probes.pool_total)"),
    "pool_empty_bytes": Metric("B", "none", "the same formula over the same actors before any weight: N empty actors"),
    "model_cost_bytes": Metric("B", "lower", "pool_total_bytes - pool_empty_bytes: what the model costs on top of N empty actors"),
    "model_copies": Metric("copies", "lower", "model_cost_bytes / model_bytes: 1 = one copy for the pool, N = one per actor"),
    # The Ray Data pipeline
    "first_forward_s": Metric("s", "lower", "median over the pool of each actor's first batch (call 0)"),
    "second_forward_s": Metric("s", "lower", "median over the pool of each actor's second batch (call 1)"),
    "first_vs_second": Metric("x", "lower", "first_forward_s / second_forward_s"),
    "latency_p50_s": Metric("s", "lower", "median per-batch latency in steady state (full batches after the warm-up calls)"),
    "latency_iqr_s": Metric("s", "lower", "interquartile range of the steady per-batch latencies"),
    "latency_p99_s": Metric("s", "lower", "99th percentile of the steady per-batch latencies"),
    "throughput_rows_s": Metric("rows/s", "higher", "steady-state rows/s of the whole pool, over the window in which every actor was past its warm-up and still busy"),
    "throughput_window_s": Metric("s", "none", "length of that window (short when Ray Data started the actors on batches far apart)"),
    "throughput_vs_naive": Metric("x", "higher", "throughput_rows_s over naive's at the same point, paired round by round"),
    "speed_vs_naive": Metric("x", "higher", "naive's latency_p50_s over this one's at the same point, paired round by round: the steady per-batch speed, shared vs private"),
    "steady_batches_min": Metric("batches", "higher", "fewest steady batches any pool actor ran (the target is 20 or more)"),
    "pipeline_actors": Metric("actors", "none", "pool actors that processed at least one batch"),
    "pipeline_wall_s": Metric("s", "lower", "the whole Ray Data job, actor start-up included"),
    "pipeline_rows_s": Metric("rows/s", "higher", "rows / pipeline_wall_s: end to end, start-up included"),
}

#: Per-node store bytes: ``store_bytes_node0`` is the driver's node, the others follow by node id.
NODE_METRIC_PREFIX = "store_bytes_node"


def metric_meta(name: str) -> tuple[str, str]:
    """(unit, better) of a metric name, per-node store metrics included; unknown names get ("", "none")."""
    if is_node_metric(name):
        return ("B", "none")
    m = METRICS.get(name)
    return (m.unit, m.better) if m else ("", "none")


def is_node_metric(name: str) -> bool:
    """Whether ``name`` is a per-node store metric (``store_bytes_node<i>``)."""
    return name.startswith(NODE_METRIC_PREFIX) and name[len(NODE_METRIC_PREFIX):].isdigit()


def describe() -> str:
    """One paragraph naming every metric, for the schema's description and the report's notes."""
    parts = [f"{name} ({m.unit or '-'}): {m.meaning}" for name, m in METRICS.items()]
    parts.append(f"{NODE_METRIC_PREFIX}<i> (B): bytes node i's object store gained (node 0 is the driver's)")
    return "; ".join(parts) + "."
