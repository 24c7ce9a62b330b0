"""The seed guide's batch-inference pipeline, shared by the ``ray_data`` checks and the benchmark.

``read_parquet`` (or another source) -> ``map_batches(PoolActor, compute=ActorPoolStrategy(size=pool))``
-> ``write_parquet``, exactly as a user writes it. The pool actor loads the wrapped model in
``__init__`` through the implementation (timed alone; its memory before any weight, after
the load, and where the weights lie are reported to the session's collector), and on every
batch returns the model's output bytes per row plus a batch key, so the driver can re-run
the original model on the very same batch and compare bit for bit (:func:`verify`). Per-call
timings ride in the output rows, so none can be lost when Ray Data retires an actor; every
few calls the actor reports its memory again (after that call's forward pass).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from . import hosts, probes
from .contract import Implementation, load_implementation
from .models import ModelCase

#: Storages below this may be inlined by Ray rather than stored; residency is judged above it.
MIN_STORED_BYTES = 100 * 1024
#: CPUs each pool actor asks for: fractional, so the read and write tasks never starve (a pool
#: that takes every CPU deadlocks Ray Data on a small machine).
POOL_ACTOR_CPUS = 0.25
#: Calls after which a pool actor reports its memory again (every call would cost the timing).
MEMORY_EVERY = 8


def flat_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor of a model's output, in a stable order (dicts, tuples, transformers' ModelOutput)."""
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def model_input(column: Any) -> torch.Tensor:
    """A batch column as a fresh tensor in torch's own (64-byte aligned) memory.

    CPU GEMM kernels take other code paths, with other rounding in the last bit, for inputs
    that start at an unaligned address, and a batch Ray Data hands out can be a view at any
    offset into a block. Copied like this in the actor and in the driver's re-run, the same
    rows give the same bits however Ray Data cut its blocks.
    """
    return torch.tensor(np.ascontiguousarray(column))


def row_bytes(out: Any, rows: int) -> list[bytes]:
    """The output's raw bytes per row (every output tensor's row, concatenated): what exactness compares."""
    for t in flat_outputs(out):
        assert t.shape[0] == rows, f"the model returned {t.shape[0]} output rows for a batch of {rows}"
    parts = [t.detach().cpu().contiguous().reshape(rows, -1).view(torch.uint8).numpy() for t in flat_outputs(out)]
    joined = np.concatenate(parts, axis=1) if parts else np.zeros((rows, 0), np.uint8)
    return [r.tobytes() for r in joined]


def _memory() -> dict[str, Any]:
    return {**probes.memory().as_dict(), "split": probes.memory_split().as_dict()}


class PoolActor:
    """The ``map_batches`` callable: loads in ``__init__`` (as the seed guide says), infers in ``__call__``."""

    def __init__(self, impl_spec: str, wrapped_box: list, device: str, method: str, inputs: list[str], run: str, reports: Any):
        # One thread here and in the driver's re-run: GEMM sums in a thread-count-dependent order.
        torch.set_num_threads(1)
        impl = load_implementation(impl_spec)  # outside the timing: an import, perhaps an entry-point scan
        empty = _memory()  # this actor's runtime, before any weight
        start_wall, start = time.time(), time.perf_counter()
        self.model = impl.load(wrapped_box[0], device)
        load_s = time.perf_counter() - start
        self.device, self.method, self.inputs = device, method, inputs
        self.pid, self.calls, self.run, self.reports = os.getpid(), 0, run, reports
        record = {
            "kind": "loaded",
            "pid": self.pid,
            "node": ray.get_runtime_context().get_node_id(),
            "load_start": start_wall,
            "load_s": load_s,
            "empty": empty,
            "loaded": _memory(),
            "residency": probes.residency(self.model, MIN_STORED_BYTES).as_dict(),
        }
        ray.get(reports.add.remote(run, record))  # synchronous: Ray Data may retire the actor any time after

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        t0_wall, t0 = time.time(), time.perf_counter()
        args = tuple(model_input(batch[k]).to(self.device) for k in self.inputs)
        with torch.no_grad():
            out = getattr(self.model, self.method)(*args)
        outputs = row_bytes(out, n)
        latency = time.perf_counter() - t0
        call = self.calls
        self.calls += 1
        if call % MEMORY_EVERY == 0:  # after this call's forward, outside its timing
            ray.get(self.reports.add.remote(self.run, {"kind": "memory", "pid": self.pid, "call": call, **_memory()}))
        return {
            "id": np.asarray(batch["id"], dtype=np.int64),
            "output": np.array(outputs, dtype=object),
            "batch_key": np.array([f"{self.pid}-{call}"] * n, dtype=object),
            "pos": np.arange(n, dtype=np.int64),
            "pid": np.full(n, self.pid, dtype=np.int64),
            "call": np.full(n, call, dtype=np.int64),
            "t0": np.full(n, t0_wall),
            "latency_s": np.full(n, latency),
        }


@dataclass
class InputData:
    """Rows of a model's inputs (batched along dim 0), kept in the driver too so any batch can be rebuilt."""

    case: ModelCase
    arrays: list[np.ndarray]
    path: Path
    rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.rows = len(self.arrays[0])

    @property
    def columns(self) -> list[str]:
        return [f"in{i}" for i in range(len(self.arrays))]

    def batch(self, row_ids: list[int]) -> tuple[torch.Tensor, ...]:
        return tuple(model_input(a[row_ids]) for a in self.arrays)


def make_inputs(case: ModelCase, rows: int, seed: int, workdir: Path, files: int = 8) -> InputData:
    """``rows`` seeded rows shaped like the case's example inputs, written once as ``files`` parquet files."""
    g = torch.Generator().manual_seed(seed)
    arrays = []
    for t in case.inputs():
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise TypeError(f"model {case.name}: its inputs are not batched tensors; the pipeline needs them")
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
    path = Path(workdir) / f"in-{case.name}-{rows}-{seed}-{files}"
    if not path.exists():
        _write_parquet(path, arrays, files)
    return InputData(case, arrays, path)


def _write_parquet(path: Path, arrays: list[np.ndarray], files: int) -> None:
    # Several files, so the read gives several blocks and every pool actor gets batches.
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    ids = np.arange(len(arrays[0]), dtype=np.int64)
    for i, idx in enumerate(np.array_split(ids, files)):
        if len(idx):
            cols = {"id": pa.array(ids[idx]), **{f"in{j}": ArrowTensorArray.from_numpy(a[idx]) for j, a in enumerate(arrays)}}
            pq.write_table(pa.table(cols), tmp / f"part-{i:03d}.parquet")
    try:
        tmp.rename(path)
    except OSError:  # another process wrote the same input meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class PipelineRun:
    """One pipeline run: the output table, each pool actor's load report, its later memory samples, the wall time."""

    table: Any
    reports: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    wall_s: float

    def last_memory(self, pid: int) -> dict[str, Any] | None:
        """The actor's last memory sample (after a forward pass), None if it sent none."""
        mine = [s for s in self.samples if s["pid"] == pid]
        return max(mine, key=lambda s: s["call"]) if mine else None


@contextmanager
def ray_data_settings() -> Iterator[None]:
    """This driver's Ray Data settings for one run, restored afterwards.

    - No progress bars (logs are for verdicts).
    - The pool dispatches once every actor has loaded, so each gets its share of a small input.
    - Ray 2.60's default parquet reader (datasource v2) packs files into 128 MiB read units (a
      small input becomes one block for one actor) and starts footer-reading actors, new
      processes, on every read; the v1 reader makes a block per file and reads in plain tasks.
    """
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.wait_for_min_actors_s, ctx.use_datasource_v2)
    ctx.enable_progress_bars, ctx.wait_for_min_actors_s, ctx.use_datasource_v2 = False, 600, False
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.wait_for_min_actors_s, ctx.use_datasource_v2 = saved


def run(
    impl: Implementation,
    wrapped: Any,
    data: InputData,
    *,
    pool: int,
    batch: int,
    device: str = "cpu",
    out_dir: Path,
    blocks: int | None = None,
) -> PipelineRun:
    """Run read_parquet -> map_batches(actor pool loading ``wrapped``) -> write_parquet once; read the output back."""
    import pyarrow.parquet as pq
    from ray.data import ActorPoolStrategy

    from .collector import collector

    reports, run_id = collector(), uuid.uuid4().hex
    remote_args = {k: v for k, v in hosts.actor_options(impl.capabilities.worker_env).items() if k == "runtime_env"}
    if device == "cuda":
        remote_args["num_gpus"] = 1 / pool
    dst = Path(out_dir) / f"out-{run_id[:8]}"
    try:
        with ray_data_settings():
            ds = ray.data.read_parquet(str(data.path), override_num_blocks=blocks or max(8, pool))
            mapped = ds.map_batches(
                PoolActor,
                fn_constructor_kwargs={
                    "impl_spec": impl.spec,
                    "wrapped_box": [wrapped],
                    "device": device,
                    "method": data.case.method,
                    "inputs": data.columns,
                    "run": run_id,
                    "reports": reports,
                },
                batch_size=batch,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=pool),
                num_cpus=POOL_ACTOR_CPUS,
                **remote_args,
            )
            start = time.perf_counter()
            mapped.write_parquet(str(dst))
            wall = time.perf_counter() - start
        table = pq.read_table(dst)
    finally:
        records = ray.get(reports.take.remote(run_id))
        shutil.rmtree(dst, ignore_errors=True)
    loaded = [r for r in records if r["kind"] == "loaded"]
    return PipelineRun(table, loaded, [r for r in records if r["kind"] == "memory"], wall)


def batches_of(table: Any) -> dict[str, list[tuple[int, int, bytes]]]:
    """Output rows grouped by the batch that produced them: key -> [(position, row id, output bytes)]."""
    grouped: dict[str, list[tuple[int, int, bytes]]] = defaultdict(list)
    cols = table.select(["batch_key", "pos", "id", "output"]).to_pydict()
    for key, pos, rid, out in zip(cols["batch_key"], cols["pos"], cols["id"], cols["output"]):
        grouped[key].append((pos, rid, out))
    for rows in grouped.values():
        rows.sort()
    return grouped


def verify(table: Any, data: InputData, original: Any, *, sample: int | None = None) -> dict[str, Any]:
    """Every row id exactly once, and each batch's output bytes equal the original model's on that same batch.

    ``sample`` checks only that many batches (the benchmark's audit); None checks all.
    Raises AssertionError naming the first row that differs.
    """
    ids = table.column("id").to_pylist()
    missing = sorted(set(range(data.rows)) - set(ids))
    dupes = len(ids) - len(set(ids))
    assert not missing and not dupes, (
        f"ray_data: {len(missing)} row ids missing (first {missing[:5]}), {dupes} duplicated, of {data.rows}"
    )
    grouped = batches_of(table)
    keys = sorted(grouped)
    if sample is not None:
        keys = keys[:: max(1, len(keys) // sample)][:sample]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pool actors' reduction order
    try:
        for key in keys:
            rows = grouped[key]
            ids_ = [rid for _, rid, _ in rows]
            with torch.no_grad():
                expected = row_bytes(getattr(original, data.case.method)(*data.batch(ids_)), len(ids_))
            for (_, rid, got), want in zip(rows, expected):
                if got != want:
                    raise AssertionError(f"ray_data: output of row {rid} differs from the original model's on the same batch")
    finally:
        torch.set_num_threads(threads)
    return {"rows": len(ids), "batches": len(grouped), "batches_verified": len(keys)}
