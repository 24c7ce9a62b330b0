"""Measure one round of one cell, in the process that owns the Ray driver (see worker.py).

One round is what a user's batch job does, once:

1. wrap a fresh copy of the model in the driver (time; clean peak memory growth: freed
   heap returned with ``malloc_trim``, ``5`` to /proc/self/clear_refs, then VmHWM);
2. one run of the shared Ray Data pipeline (:func:`zcbench.suites.pipeline.run`): parquet
   in, ``map_batches`` on an actor pool of Ray Data's own fresh processes, parquet out. The
   pool actors load concurrently, as in a user's job (cold = the first load on each node,
   warm = the others); each reports its memory before the load, after it and after forward
   passes (:mod:`.poolmem`); every batch's timing rides in the output rows (:mod:`.steady`);
3. each node's object store bytes, the audit (:func:`pipeline.verify` on a sample of
   batches, bit for bit: a difference makes the cell INVALID), and the metadata floor
   (:mod:`.floor`).

No actor is started outside the pipeline: each fresh process costs 4-5 CPU-seconds here.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from zcbench.suites import models, pipeline, probes
from zcbench.suites.contract import Implementation, release

from . import inactor, steady
from .floor import metadata_floor_s
from .matrix import resolve_model
from .metrics import NODE_METRIC_PREFIX
from .poolmem import pool_memory


@dataclass(frozen=True)
class Job:
    """What one round needs besides the cell: input size, seed, warm-up calls and how many batches to audit."""

    rows: int
    files: int
    seed: int = 0
    warmup_calls: int = 2
    audit_batches: int = 8
    steady: bool = True  # False: a load-and-memory cell, too few batches for a steady state

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def node_order(node_ids: list[str], driver_node: str) -> list[str]:
    """The driver's node first, then the others by id: stable across the rounds of one cluster."""
    return sorted(node_ids, key=lambda n: (n != driver_node, n))


def per_node_metrics(before: dict[str, int], after: dict[str, int], driver_node: str) -> dict[str, float]:
    """``store_bytes_node<i>`` (bytes each node's store gained, never negative) and ``num_nodes``."""
    out: dict[str, float] = {"num_nodes": len(after)}
    for i, node in enumerate(node_order(list(after), driver_node)):
        out[f"{NODE_METRIC_PREFIX}{i}"] = max(0, after[node] - before.get(node, 0))
    return out


def load_metrics(loads: list[tuple[str, float, float]], driver_node: str) -> dict[str, float]:
    """Cold and warm loads from (node, start time, seconds) per pool actor.

    Cold: the first load to start on a node (on the driver's node the bytes are already in
    its store; on another node they may still have to get there). Warm: every later one.
    """
    first: dict[str, tuple[float, float]] = {}
    warm = []
    for node, t, s in sorted(loads, key=lambda x: x[1]):
        if node in first:
            warm.append(s)
        else:
            first[node] = (t, s)
    m: dict[str, float] = {}
    if driver_node in first:
        m["load_cold_s"] = first[driver_node][1]
    remote = [s for n, (_, s) in first.items() if n != driver_node]
    if remote:
        m["load_cold_remote_s"] = statistics.median(remote)
        m.setdefault("load_cold_s", min(remote))  # the pool never reached the driver's node
    if warm:
        m["load_warm_s"] = statistics.median(warm)
    return m


_INPUTS: dict[tuple, pipeline.InputData] = {}
#: Store bytes above the round's starting level still counted as settled (Ray Data's small leftovers).
SETTLED_SLACK = 2 * 2**20


def inputs(case: models.ModelCase, job: Job, workdir: Path) -> pipeline.InputData:
    """The round's input rows, built and written once per process."""
    key = (case.name, job.rows, job.seed, job.files)
    if key not in _INPUTS:
        _INPUTS[key] = pipeline.make_inputs(case, job.rows, job.seed, workdir, files=job.files)
    return _INPUTS[key]


def memory_metrics(run: pipeline.PipelineRun, model_bytes: int) -> tuple[dict[str, float], list[str]]:
    """Per-actor and pool memory (see :mod:`.poolmem`); notes say what could not be measured."""
    notes: list[str] = []
    reports = run.reports
    after = {r["pid"]: run.last_memory(r["pid"]) or r["loaded"] for r in reports}
    lacking = [r["pid"] for r in reports if run.last_memory(r["pid"]) is None]
    if lacking:
        notes.append(f"pool actor(s) {', '.join(map(str, lacking))} processed no batch: their memory is the one after the load")
    m: dict[str, float] = {
        "actor_uss_load_bytes": statistics.median(r["loaded"]["uss"] for r in reports),
        "actor_pss_load_bytes": statistics.median(r["loaded"]["pss"] for r in reports),
        "empty_uss_bytes": statistics.median(r["empty"]["uss"] for r in reports),
        "actor_uss_infer_bytes": statistics.median(a["uss"] for a in after.values()),
        "actor_model_uss_bytes": statistics.median(after[r["pid"]]["uss"] - r["empty"]["uss"] for r in reports),
    }
    m.update(pool_memory([r["empty"]["split"] for r in reports], [a["split"] for a in after.values()], model_bytes))
    return m, notes


def measure(impl: Implementation, params: dict[str, Any], job: Job, workdir: Path) -> dict[str, Any]:
    """One round of one cell; returns ``{"metrics": {name: value}, "valid": bool, "audit": str}``."""
    case = resolve_model(params["model"])
    pool, batch, device = params["pool"], params["batch"], params["device"]
    data = inputs(case, job, workdir)
    original = models.build(case)  # a fresh copy: an implementation may move the storages it wraps
    m: dict[str, float] = {"model_bytes": probes.model_bytes(original), "num_tensors": sum(1 for _ in probes.named_tensors(original))}
    m["metadata_floor_s"] = metadata_floor_s(original)
    driver_node = ray.get_runtime_context().get_node_id()
    nodes_before = probes.store_bytes_by_node()

    probes.trim_heap()  # freed heap goes back to the kernel, so the wrap's allocations show as growth
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS: a clean peak for this process
    rss_before = _status_bytes("VmRSS")
    start = time.perf_counter()
    wrapped = impl.wrap(original, "actor")
    m["wrap_s"] = time.perf_counter() - start
    m["wrap_peak_bytes"] = max(0, _status_bytes("VmHWM") - rss_before)
    m["wrap_peak_ratio"] = m["wrap_peak_bytes"] / m["model_bytes"] if m["model_bytes"] else float("nan")
    nodes_wrapped = probes.store_bytes_by_node()

    try:
        run = pipeline.run(impl, wrapped, data, pool=pool, batch=batch, device=device, out_dir=workdir, blocks=job.files)
        nodes_after = probes.store_bytes_by_node()
        if device == "cpu" and inactor.imports_model_code(original):
            m["load_imported_s"] = inactor.load_with_code_imported_s(impl, wrapped)
    finally:
        release(impl, wrapped)
        del wrapped  # the last reference in the driver: the stores can free the model once the pool is gone

    try:
        seen = pipeline.verify(run.table, data, original, sample=job.audit_batches)
        valid = True
        note = (f"every one of {seen['rows']} rows once; {seen['batches_verified']} of {seen['batches']} batches equal "
                "the original model's outputs bit for bit")  # fmt: skip
    except AssertionError as exc:
        valid, note = False, str(exc)
    reports = run.reports
    # The next round's "before" must not still hold this round's copies (freeing is asynchronous).
    settled = probes.wait_store_bytes(lambda total: total <= sum(nodes_before.values()) + SETTLED_SLACK, timeout_s=20.0)
    notes = [] if settled <= sum(nodes_before.values()) + SETTLED_SLACK else [
        f"the object stores still held {(settled - sum(nodes_before.values())) / 2**20:.0f} MiB more than before the round 20 s after it"]

    # The most each store held: the driver's copy right after wrap, other nodes' copies once the pool loaded.
    nodes_peak = {n: max(nodes_after.get(n, 0), nodes_wrapped.get(n, 0)) for n in nodes_after}
    m.update(per_node_metrics(nodes_before, nodes_peak, driver_node))
    m["store_bytes"] = sum(max(0, v - nodes_before.get(n, 0)) for n, v in nodes_peak.items())

    # The implementation's own load, timed in the pool actor.
    loads = [(r["node"], r["load_start"], r["load_s"]) for r in reports]
    m.update(load_metrics(loads, driver_node))
    m["in_store_fraction"] = min(r["residency"]["fraction_in_store"] for r in reports)
    calls = steady.calls_of(run.table)
    timings = steady.summarize_calls(calls, batch, job.warmup_calls)
    if not job.steady:
        timings = {k: v for k, v in timings.items() if k in steady.NOT_STEADY}
    m.update(timings)
    mem, mem_notes = memory_metrics(run, int(m["model_bytes"]))
    m.update(mem)
    notes += mem_notes
    m["pipeline_wall_s"] = run.wall_s
    m["pipeline_rows_s"] = data.rows / run.wall_s if run.wall_s > 0 else float("nan")
    if notes:
        note += "; " + "; ".join(notes)
    return {"metrics": m, "valid": valid, "audit": note}

