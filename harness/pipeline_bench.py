"""The real Ray Data pipeline of the seed: parquet in → map_batches on an actor pool → parquet out.

Each pool actor loads the model through the implementation, times every ``__call__``
itself, and reports to a collector actor; the first batch of every actor is audited
against the original model in the driver, bit for bit, on the very same batch.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from zcbench.suites.cases import ModelCase
from zcbench.suites.contract import Implementation, load_implementation

from .stats import percentile

#: CPUs each pool actor asks for: pool 8 takes half of the 8 logical CPUs, read/write tasks never starve.
POOL_ACTOR_CPUS = 0.5
#: Rows of each actor's first batch that are compared with the original model.
AUDIT_ROWS = 2
#: Input parquet files, and blocks the pipeline splits the input into before the pool.
INPUT_FILES = 8


@ray.remote(num_cpus=0)
class Collector:
    """Receives per-call timings and audit samples from the pool actors."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def get(self) -> list[dict[str, Any]]:
        return self.records


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "to_tuple"):  # transformers ModelOutput
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


class PoolActor:
    """The map_batches callable: loads in ``__init__`` (as the seed recommends), infers in ``__call__``."""

    def __init__(self, impl_spec: str, wrapped_box: list, device: str, method: str, n_inputs: int, collector: Any):
        torch.set_num_threads(1)  # the driver's audit uses one thread too: same kernels, same bits
        self.impl = load_implementation(impl_spec)
        start = time.perf_counter()
        self.model = self.impl.load(wrapped_box[0], device)
        self.load_s = time.perf_counter() - start
        self.device, self.method, self.n_inputs = device, method, n_inputs
        self.collector = collector
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0_wall, t0 = time.time(), time.perf_counter()
        inputs = tuple(torch.as_tensor(np.array(batch[f"in{i}"])).to(self.device) for i in range(self.n_inputs))
        with torch.no_grad():
            out = getattr(self.model, self.method)(*inputs)
        flat = _flat_tensors(out)
        rows = len(batch["row_id"])
        digest = flat[0].detach().reshape(rows, -1).double().sum(1).cpu().numpy() if flat else np.zeros(rows)
        latency = time.perf_counter() - t0
        t1_wall = time.time()
        if self.calls == 0:
            # Synchronous, outside the timed part: a fire-and-forget call can be lost when
            # Ray Data retires the actor at the end of the dataset.
            audit = {"row_ids": batch["row_id"].tolist(), "outputs": [t.detach()[:AUDIT_ROWS].cpu() for t in flat]}
            ray.get(self.collector.add.remote({"pid": os.getpid(), "load_s": self.load_s, "audit": audit}))
        call = self.calls
        self.calls += 1
        # Timings travel with the rows into the output parquet, so none can be lost.
        return {
            "row_id": batch["row_id"],
            "digest": digest,
            "pid": np.full(rows, os.getpid(), dtype=np.int64),
            "call": np.full(rows, call, dtype=np.int64),
            "t0": np.full(rows, t0_wall),
            "t1": np.full(rows, t1_wall),
            "latency_s": np.full(rows, latency),
        }


@dataclass
class InputData:
    """The pipeline's input rows, kept in the driver too so the audit can rebuild any batch."""

    case: ModelCase
    arrays: list[np.ndarray]
    path: Path
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.arrays[0])

    def batch(self, row_ids: list[int]) -> tuple[torch.Tensor, ...]:
        return tuple(torch.from_numpy(a[row_ids].copy()) for a in self.arrays)


def make_inputs(case: ModelCase, rows: int, seed: int, workdir: Path) -> InputData:
    """``rows`` seeded rows shaped like the case's example inputs (batch along dim 0), written as parquet."""
    g = torch.Generator().manual_seed(seed)
    arrays = []
    for t in case.inputs():
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise TypeError(f"model {case.name}: its inputs are not batched tensors; the pipeline benchmark needs them")
        shape = (rows, *t.shape[1:])
        if t.dtype.is_floating_point:
            if t.dtype == torch.bfloat16:
                raise TypeError(f"model {case.name}: bfloat16 inputs cannot go through parquet")
            a = torch.randn(shape, generator=g, dtype=t.dtype)
        elif t.dtype == torch.bool:
            a = torch.randint(0, 2, shape, generator=g).bool()
        else:
            a = torch.randint(int(t.min()), int(t.max()) + 1, shape, generator=g, dtype=t.dtype)
        arrays.append(a.contiguous().numpy())
    path = workdir / f"in-{case.name}-{rows}-{seed}"
    if not path.exists():
        _write_parquet_files(path, np.arange(rows, dtype=np.int64), arrays, INPUT_FILES)
    return InputData(case, arrays, path)


def _write_parquet_files(path: Path, row_ids: np.ndarray, arrays: list[np.ndarray], files: int) -> None:
    # Several files, so the read gives several blocks and no shuffle (repartition) is needed.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for i, idx in enumerate(np.array_split(np.arange(len(row_ids)), files)):
        if len(idx) == 0:
            continue
        cols = {"row_id": pa.array(row_ids[idx])}
        cols.update({f"in{j}": ArrowTensorArray.from_numpy(a[idx]) for j, a in enumerate(arrays)})
        pq.write_table(pa.table(cols), tmp / f"part-{i:03d}.parquet")
    tmp.rename(path)


def audit(records: list[dict[str, Any]], original: Any, data: InputData) -> tuple[bool, str]:
    """Compare every audited batch's first rows with the original model on the same batch, exactly."""
    from zcbench.suites.compare import first_difference

    samples = [r["audit"] for r in records if "audit" in r]
    if not samples:
        return False, "no batch was audited"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for s in samples:
            with torch.no_grad():
                expected = _flat_tensors(getattr(original, data.case.method)(*data.batch(s["row_ids"])))
            got = s["outputs"]
            exp = [t[:AUDIT_ROWS] for t in expected]
            diff = first_difference(got, exp, f"rows {s['row_ids'][:AUDIT_ROWS]}")
            if diff:
                return False, f"output differs from the original model: {diff}"
    finally:
        torch.set_num_threads(threads)
    return True, f"{len(samples)} batches x {AUDIT_ROWS} rows equal the original model's outputs bit for bit"


def run(impl: Implementation, wrapped: Any, original: Any, data: InputData, pool: int, batch: int, device: str, workdir: Path) -> dict[str, Any]:
    """Run the pipeline once; return throughput, latency percentiles and the audit verdict."""
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False
    collector = Collector.remote()
    env = dict(impl.capabilities.worker_env)
    remote_args: dict[str, Any] = {"runtime_env": {"env_vars": env}} if env else {}
    if device == "cuda":
        remote_args["num_gpus"] = 1 / pool
    out_dir = workdir / f"out-{os.getpid()}-{time.time_ns()}"
    try:
        # Ray 2.60's parquet reader hands the pool a single block for small inputs (one actor
        # would do all the work); an explicit split gives every actor of the pool batches.
        ds = ray.data.read_parquet(str(data.path)).repartition(max(INPUT_FILES, pool))
        mapped = ds.map_batches(
            PoolActor,
            fn_constructor_kwargs={
                "impl_spec": impl.spec,
                "wrapped_box": [wrapped],
                "device": device,
                "method": data.case.method,
                "n_inputs": len(data.arrays),
                "collector": collector,
            },
            batch_size=batch,
            batch_format="numpy",
            compute=ActorPoolStrategy(size=pool),
            num_cpus=POOL_ACTOR_CPUS,
            **remote_args,
        )
        start = time.perf_counter()
        mapped.write_parquet(str(out_dir))
        wall = time.perf_counter() - start
        records = ray.get(collector.get.remote())
        calls, written = _calls(out_dir)
    finally:
        ray.kill(collector)
        _rmtree(out_dir)
    if not calls:
        raise RuntimeError("the pipeline wrote no rows")
    rows_seen = sum(r["rows"] for r in calls)
    span = max(r["t1"] for r in calls) - min(r["t0"] for r in calls)
    later = [r["latency_s"] for r in calls if r["call"] > 0] or [r["latency_s"] for r in calls]
    ok, note = audit(records, original, data)
    if written != data.rows or rows_seen != data.rows:
        ok, note = False, f"{data.rows} rows in, {rows_seen} seen by actors, {written} written"
    return {
        "throughput_rows_s": rows_seen / span if span > 0 else float("nan"),
        "pipeline_rows_s": written / wall,
        "latency_p50_s": percentile(later, 50),
        "latency_p99_s": percentile(later, 99),
        "pipeline_actors": len({r["pid"] for r in calls}),
        "valid": ok,
        "audit": note,
    }


def _calls(path: Path) -> tuple[list[dict[str, Any]], int]:
    """One record per ``__call__`` (pid, call, t0, t1, latency, rows) from the output parquet, and its row count."""
    import pyarrow.parquet as pq

    files = sorted(path.rglob("*.parquet"))
    if not files:
        return [], 0
    cols = ["pid", "call", "t0", "t1", "latency_s"]
    table = pq.ParquetDataset(files).read(columns=cols).to_pydict()
    calls: dict[tuple[int, int], dict[str, Any]] = {}
    for pid, call, t0, t1, lat in zip(*(table[c] for c in cols)):
        rec = calls.setdefault((pid, call), {"pid": pid, "call": call, "t0": t0, "t1": t1, "latency_s": lat, "rows": 0})
        rec["rows"] += 1
    return list(calls.values()), len(table["pid"])


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
