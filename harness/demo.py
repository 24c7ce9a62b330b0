"""End-to-end demo: the seed's Ray Data batch-inference pattern with the reference ``ModelWrapper``.

``python -m zcbench.harness.demo`` writes parquet inputs, runs ``read_parquet →
map_batches(InferenceActor, fn_constructor_kwargs={"model_wrapper": wrapper}) →
write_parquet``, checks every output row against the original model and prints a
one-screen summary. ``--compare`` instead measures load time and per-actor memory of
the reference against actors that each unpickle their own copy (interleaved rounds).
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
import torch

from zcbench.reference import ModelWrapper
from zcbench.suites import cases, probes
from zcbench.suites.cluster import ensure_ray

MiB = 2**20
WIDTH = 1024  # input width of cases.Blob


def _touch(model: Any) -> None:
    """Read every weight byte once, so memory figures count the pages a forward pass maps."""
    for _, t in probes.named_tensors(model):
        torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).sum()


def _measured_load(load) -> tuple[Any, dict[str, Any]]:
    """Run ``load()`` in this process and report its time, memory growth and where the weights lie."""
    gc.collect()
    before = probes.memory()
    start = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - start
    _touch(model)
    after = probes.memory()
    where = probes.residency(model)
    return model, {
        "pid": os.getpid(),
        "load_s": load_s,
        "uss": after.uss,
        "pss": after.pss,
        "uss_growth": after.uss - before.uss,
        "store_pss": after.store_pss,
        "in_store": where.fraction_in_store,
    }


@ray.remote(num_cpus=0)
class _Reports:
    """Collects one load report per inference actor (pool actors are otherwise anonymous)."""

    def __init__(self):
        self.reports: list[dict[str, Any]] = []

    def add(self, report: dict[str, Any]) -> None:
        self.reports.append(report)

    def all(self) -> list[dict[str, Any]]:
        return self.reports


class InferenceActor:
    """The seed's Ray Data callable: loads the shared model once per actor, then serves batches."""

    def __init__(self, model_wrapper: ModelWrapper, reports: Any = None):
        self.model, report = _measured_load(model_wrapper.load)
        if reports is not None:
            ray.get(reports.add.remote(report))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.as_tensor(np.stack(batch["x"]).astype(np.float32, copy=False))
        with torch.no_grad():
            y = self.model(x)
        # BLAS results can depend on the batch's shape, so the check recomputes each batch as it was.
        first = np.full(len(batch["row"]), int(batch["row"][0]), dtype=np.int64)
        return {"row": batch["row"], "batch": first, "y": list(y.numpy())}


@dataclass
class DemoResult:
    """What one demo run measured."""

    model_bytes: int
    rows: int
    rows_per_s: float
    store_bytes: int
    mismatches: list[int]
    actors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every row identical, every actor's weights in the store, and no actor paid for a copy."""
        return (
            not self.mismatches
            and bool(self.actors)
            and all(a["in_store"] == 1.0 and a["uss_growth"] < 0.25 * self.model_bytes for a in self.actors)
        )


def _write_inputs(path: str, rows: int, files: int) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.parquet as pq

    xs = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(3)).numpy()
    os.makedirs(path, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(rows), files)):
        column = pa.FixedSizeListArray.from_arrays(pa.array(xs[chunk].ravel()), WIDTH)
        pq.write_table(pa.table({"row": pa.array(chunk, pa.int64()), "x": column}), f"{path}/part-{i:03d}.parquet")
    return xs


def _verify(model: torch.nn.Module, xs: np.ndarray, out_dir: str) -> tuple[int, list[int]]:
    """Rows read back from the output parquet that differ from the original model's (recomputed per batch)."""
    import pyarrow.parquet as pq

    table = pq.read_table(out_dir).to_pydict()
    groups: dict[int, list[tuple[int, list[float]]]] = {}
    for row, batch, y in zip(table["row"], table["batch"], table["y"]):
        groups.setdefault(batch, []).append((row, y))
    bad = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (OMP_NUM_THREADS=1): BLAS order depends on threads
    try:
        with torch.no_grad():
            expected_by_batch = {
                batch: model(torch.as_tensor(xs[[r for r, _ in members]])) for batch, members in groups.items()
            }
    finally:
        torch.set_num_threads(threads)
    for batch, members in groups.items():
        expected = expected_by_batch[batch]
        for (row, y), want in zip(members, expected):
            if not torch.equal(torch.tensor(y, dtype=torch.float32), want):
                bad.append(row)
    seen = sorted(table["row"])
    bad += sorted(set(range(len(xs))) - set(seen))  # lost rows count as mismatches
    return len(seen), bad


def run_demo(model_mib: int = 64, actors: int = 4, rows: int = 512, out: str | None = None) -> DemoResult:
    """Run the Ray Data pipeline once with the reference and check every output row."""
    from ray.data import ActorPoolStrategy, DataContext

    ensure_ray()
    DataContext.get_current().enable_progress_bars = False
    out = out or tempfile.mkdtemp(prefix="zcbench-demo-")
    model = cases.build_blob(model_mib)
    xs = _write_inputs(f"{out}/inputs", rows, files=max(2 * actors, 1))
    wrapper = ModelWrapper.from_model(model)
    reports = _Reports.remote()
    start = time.perf_counter()
    (
        ray.data.read_parquet(f"{out}/inputs", override_num_blocks=max(2 * actors, 1))
        .map_batches(
            InferenceActor,
            fn_constructor_kwargs={"model_wrapper": wrapper, "reports": reports},
            compute=ActorPoolStrategy(size=actors),
            num_cpus=0.25,
            batch_size=32,
        )
        .write_parquet(f"{out}/outputs")
    )
    elapsed = time.perf_counter() - start
    store = sum(probes.store_bytes_by_node().values())
    done, bad = _verify(model, xs, f"{out}/outputs")
    return DemoResult(wrapper.info.nbytes, done, done / elapsed, store, bad, ray.get(reports.all.remote()))


def summary(result: DemoResult) -> str:
    """One screen: model size, per-actor memory and load time, store bytes, throughput, verdict."""
    lines = [
        f"model            {result.model_bytes / MiB:8.1f} MiB",
        f"object store     {result.store_bytes / MiB:8.1f} MiB used (all objects on the node)",
        f"rows             {result.rows:8d}   ({result.rows_per_s:.1f} rows/s end to end)",
        f"{'actor pid':>10} {'load s':>8} {'USS MiB':>9} {'+USS MiB':>9} {'PSS MiB':>9} {'store PSS':>10} {'in store':>9}",
    ]
    for a in sorted(result.actors, key=lambda a: a["pid"]):
        lines.append(
            f"{a['pid']:>10} {a['load_s']:8.3f} {a['uss'] / MiB:9.1f} {a['uss_growth'] / MiB:9.1f} "
            f"{a['pss'] / MiB:9.1f} {a['store_pss'] / MiB:10.1f} {a['in_store']:9.0%}"
        )
    if result.mismatches:
        lines.append(f"MISMATCHED rows: {result.mismatches[:10]}{' ...' if len(result.mismatches) > 10 else ''}")
    verdict = "PASS" if result.ok else "FAIL"
    lines.append(
        f"verdict          {verdict}: {result.rows - len(result.mismatches)}/{result.rows} rows identical, "
        f"{len(result.actors)} actors, weights in store: {all(a['in_store'] == 1.0 for a in result.actors)}"
    )
    return "\n".join(lines)


@ray.remote(num_cpus=0.25)
class _Loader:
    """One fresh process per measurement, loading either the reference or a pickled copy."""

    def reference(self, wrapper_box: list) -> dict[str, Any]:
        self.model, report = _measured_load(wrapper_box[0].load)
        return report

    def unpickle(self, ref_box: list) -> dict[str, Any]:
        self.model, report = _measured_load(lambda: pickle.loads(ray.get(ref_box[0])))
        return report


def _round(kind: str, model: torch.nn.Module, actors: int) -> list[dict[str, Any]]:
    if kind == "reference":
        shared: Any = ModelWrapper.from_model(model)
    else:
        shared = ray.put(pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL))
    loaders = [_Loader.remote() for _ in range(actors)]
    try:
        ray.get([a.__ray_ready__.remote() for a in loaders])  # start-up is not load time
        return ray.get([getattr(a, kind).remote([shared]) for a in loaders])
    finally:
        for a in loaders:
            ray.kill(a, no_restart=True)


def compare(model_mib: int = 256, actors: int = 4, rounds: int = 2) -> dict[str, dict[str, float]]:
    """Reference vs per-actor unpickled copies, interleaved (A B A B ...); medians over actors and rounds."""
    ensure_ray()
    model = cases.build_blob(model_mib)
    found: dict[str, list[dict[str, Any]]] = {"reference": [], "unpickle": []}
    for _ in range(rounds):
        for kind in found:
            found[kind] += _round(kind, model, actors)
    return {
        kind: {
            "load_s": statistics.median(r["load_s"] for r in reports),
            "uss_mib": statistics.median(r["uss"] for r in reports) / MiB,
            "uss_growth_mib": statistics.median(r["uss_growth"] for r in reports) / MiB,
            "pss_mib": statistics.median(r["pss"] for r in reports) / MiB,
            "in_store": statistics.median(r["in_store"] for r in reports),
            "samples": len(reports),
        }
        for kind, reports in found.items()
    }


def compare_summary(result: dict[str, dict[str, float]], model_mib: int, actors: int, rounds: int) -> str:
    lines = [
        f"{model_mib} MiB model, {actors} actors, {rounds} interleaved rounds; medians over actors x rounds",
        f"{'variant':>10} {'load s':>8} {'USS MiB':>9} {'+USS MiB':>9} {'PSS MiB':>9} {'in store':>9} {'n':>3}",
    ]
    for kind, r in result.items():
        lines.append(
            f"{kind:>10} {r['load_s']:8.3f} {r['uss_mib']:9.1f} {r['uss_growth_mib']:9.1f} "
            f"{r['pss_mib']:9.1f} {r['in_store']:9.0%} {r['samples']:3d}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zcbench.harness.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model-mib", type=int, default=64)
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--out", default=None, help="folder for the parquet inputs and outputs")
    parser.add_argument("--compare", action="store_true", help="measure reference vs per-actor unpickled copies")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per variant (--compare)")
    args = parser.parse_args(argv)
    if args.compare:
        result = compare(args.model_mib, args.actors, args.rounds)
        print(compare_summary(result, args.model_mib, args.actors, args.rounds))
        return 0
    result = run_demo(args.model_mib, args.actors, args.rows, args.out)
    print(summary(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
