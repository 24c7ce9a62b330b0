"""Ray Data end to end: the seed's usage pattern (parquet in, ``map_batches`` with an actor pool, parquet out).

The model is loaded inside Ray Data's own pool actors, so the check also records where
the loaded weights lie in those processes (a side channel of extra output columns).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import probes
from ..cases import ModelCase, blob_case
from ..contract import load_implementation, release
from ..registry import check

ROWS = 256
FILES = 8
BATCH = 32
POOL = 2
#: Storages below this may be inlined by Ray rather than stored; zero-copy is judged above it.
MIN_STORED_BYTES = 100 * 1024
CASE: ModelCase = blob_case(16)
WIDTH = 1024  # blob_case's input width


class InferenceActor:
    """The seed's actor: loads the model once in ``__init__`` and runs it on each batch.

    Besides the model's output (raw float32 bytes per row, so the comparison is exact)
    it returns where the loaded weights lie in this process, and a batch key so the
    driver can rebuild the very same batch.
    """

    def __init__(self, impl_spec: str, model_wrapper: Any):
        # One thread here and in the driver's re-run: GEMM sums in a thread-count-dependent order.
        torch.set_num_threads(1)
        self.model = load_implementation(impl_spec).load(model_wrapper, "cpu")
        self.residency = probes.residency(self.model, MIN_STORED_BYTES)
        self.pid = os.getpid()
        self.calls = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = np.stack([np.asarray(f, dtype=np.float32) for f in batch["features"]])
        with torch.no_grad():
            out = self.model(torch.from_numpy(features)).numpy()
        n = len(out)
        key = f"{self.pid}-{self.calls}"
        self.calls += 1
        r = self.residency
        return {
            "id": np.asarray(batch["id"], dtype=np.int64),
            "output": np.array([row.tobytes() for row in out], dtype=object),
            "batch_key": np.array([key] * n, dtype=object),
            "pos": np.arange(n, dtype=np.int64),
            "pid": np.full(n, self.pid, dtype=np.int64),
            "bytes_total": np.full(n, r.bytes_total, dtype=np.int64),
            "bytes_in_store": np.full(n, r.bytes_in_store, dtype=np.int64),
            "outside": np.array([",".join(r.outside[:3])] * n, dtype=object),
        }


def _write_input(directory: str) -> np.ndarray:
    """Write ``ROWS`` rows (id, float32 feature vector) as ``FILES`` parquet files; return the features."""
    rng = np.random.default_rng(3)
    features = rng.standard_normal((ROWS, WIDTH), dtype=np.float32)
    per_file = ROWS // FILES
    for i in range(FILES):
        lo, hi = i * per_file, (i + 1) * per_file
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(features[lo:hi].ravel()), WIDTH)
        table = pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)), "features": vectors})
        pq.write_table(table, os.path.join(directory, f"part-{i:02d}.parquet"))
    return features


def verify_results(table: pa.Table, features: np.ndarray, original: torch.nn.Module) -> dict[str, Any]:
    """Every id once, each batch's output bytes equal to the original model on the same batch."""
    ids = table.column("id").to_pylist()
    missing = sorted(set(range(len(features))) - set(ids))
    dupes = len(ids) - len(set(ids))
    assert not missing and not dupes, (
        f"ray_data: {len(missing)} row ids missing (first {missing[:5]}), {dupes} duplicated, of {len(features)}"
    )
    batches: dict[str, list[tuple[int, int, bytes]]] = defaultdict(list)
    for key, pos, rid, out in zip(
        table.column("batch_key").to_pylist(),
        table.column("pos").to_pylist(),
        ids,
        table.column("output").to_pylist(),
    ):
        batches[key].append((pos, rid, out))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same reduction order as the pool actors
    try:
        _compare_batches(batches, features, original)
    finally:
        torch.set_num_threads(threads)
    return {"rows": len(ids), "batches": len(batches)}


def _compare_batches(batches: dict[str, list[tuple[int, int, bytes]]], features: np.ndarray, original: Any) -> None:
    for rows in batches.values():
        rows.sort()
        # Re-run the original on the same rows in the same order: GEMM results may depend on batch shape.
        with torch.no_grad():
            expected = original(torch.from_numpy(features[[rid for _, rid, _ in rows]])).numpy()
        for (_, rid, got), want in zip(rows, expected):
            if got != want.tobytes():
                diff = np.abs(np.frombuffer(got, dtype=np.float32) - want).max() if len(got) == want.nbytes else "n/a"
                raise AssertionError(f"ray_data: output of row {rid} differs from the original model (max abs diff {diff})")


@check("ray_data.end_to_end")
def check_ray_data_end_to_end(impl) -> dict[str, Any]:
    """read_parquet → map_batches(actor pool loading the wrapped model) → write_parquet gives exact outputs, zero-copy."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = False
    original = CASE.build()
    wrapped = impl.wrap(original, "actor")
    remote_args: dict[str, Any] = {}
    if impl.capabilities.worker_env:
        remote_args["runtime_env"] = {"env_vars": dict(impl.capabilities.worker_env)}
    try:
        with tempfile.TemporaryDirectory(prefix="zcbench-ray-data-") as tmp:
            src, dst = os.path.join(tmp, "in"), os.path.join(tmp, f"out-{uuid.uuid4().hex[:8]}")
            os.makedirs(src)
            features = _write_input(src)
            ds = ray.data.read_parquet(src, override_num_blocks=FILES).map_batches(
                InferenceActor,
                fn_constructor_kwargs={"impl_spec": impl.spec, "model_wrapper": wrapped},
                batch_size=BATCH,
                batch_format="numpy",
                compute=ActorPoolStrategy(size=POOL),
                num_cpus=0.25,  # whole CPUs for the pool starve the read tasks on small machines
                **remote_args,
            )
            ds.write_parquet(dst)
            table = pq.read_table(dst)
    finally:
        release(impl, wrapped)
    seen = verify_results(table, features, original)
    pids = sorted(set(table.column("pid").to_pylist()))
    total = table.column("bytes_total").to_pylist()
    inside = table.column("bytes_in_store").to_pylist()
    outside = [o for o in table.column("outside").to_pylist() if o]
    observed = {**seen, "actors_used": len(pids), "bytes_total": max(total), "bytes_in_store_min": min(inside)}
    if impl.capabilities.zero_copy:
        assert min(total) > 0, "ray_data: the loaded model has no CPU tensor storage above 100 KiB to locate"
        short = [(t, i) for t, i in zip(total, inside) if i < t]
        assert not short, (
            f"ray_data: in a Ray Data pool actor only {short[0][1]} of {short[0][0]} weight bytes lie in the "
            f"object store (copied: {outside[0] if outside else '?'})"
        )
    return observed
