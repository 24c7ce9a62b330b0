"""Fakes shared by the harness tests: a runner with fabricated figures and small matrices around it."""

from __future__ import annotations

import io

from zcbench.harness import bench
from zcbench.harness.matrix import Settings

MiB = 2**20


def infos(names=("reference", "naive")):
    """Implementation records as bench.implementation_info makes them, without importing anything."""
    return [{"name": n, "version": "0.0-test", "spec": f"fake:{n}", "capabilities": {"cpu": True, "cuda": False}, "process_env": {}}
            for n in names]


def fabricated(impl: str, pool: int, batch: int, calls: int = 0, slow: float = 1.0) -> dict:
    """Figures shaped like a real round's: naive holds one private copy per actor, the others share one."""
    copies = pool if impl == "naive" else 0
    empty, size = 230 * MiB, 64 * MiB
    thr = 100.0 * batch * (0.8 if impl == "naive" else 1.0) / slow + calls % 3
    uss = empty + (size if copies else 2 * MiB)
    shared_runtime, shared_model = 150 * MiB, (0 if copies else size)
    total = pool * uss + shared_runtime + shared_model
    return {
        "model_bytes": size, "num_tensors": 32, "metadata_floor_s": 0.0002, "wrap_s": 0.1, "wrap_peak_bytes": size,
        "wrap_peak_ratio": 1.0, "store_bytes": 0 if copies else size, "load_cold_s": 0.05 * slow, "load_warm_s": 0.01,
        "first_forward_s": 0.02, "second_forward_s": 0.019, "first_vs_second": 1.05, "empty_uss_bytes": empty,
        "actor_uss_load_bytes": uss, "actor_pss_load_bytes": uss + 20 * MiB, "actor_uss_infer_bytes": uss,
        "actor_model_uss_bytes": uss - empty, "pool_private_bytes": pool * uss, "pool_shared_bytes": shared_runtime + shared_model,
        "pool_total_bytes": total, "pool_empty_bytes": pool * empty + shared_runtime,
        "model_cost_bytes": total - pool * empty - shared_runtime, "model_copies": (total - pool * empty - shared_runtime) / size,
        "throughput_rows_s": thr, "latency_p50_s": 0.0125 if impl == "naive" else 0.01, "latency_iqr_s": 0.001, "latency_p99_s": 0.02,
        "steady_batches_min": 22, "pipeline_actors": pool, "pipeline_wall_s": 3.0, "pipeline_rows_s": thr / 3,
    }  # fmt: skip


class FakeRunner:
    """Deterministic fabricated measurements; can fail, invalidate or interrupt on demand."""

    def __init__(self, interrupt_at=None, fail=(), invalid=(), slow=1.0):
        self.calls: list[tuple[str, dict]] = []
        self.jobs: list[dict] = []
        self.interrupt_at, self.fail, self.invalid, self.slow = interrupt_at, set(fail), set(invalid), slow
        self.processes = 1

    def run(self, impl, params, job, timeout_s):
        self.calls.append((impl, dict(params)))
        self.jobs.append(dict(job))
        if self.interrupt_at is not None and len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        if impl in self.fail:
            return {"ok": False, "error": "boom"}
        m = fabricated(impl, params["pool"], params["batch"], len(self.calls), self.slow)
        valid = impl not in self.invalid
        return {"ok": True, "metrics": m, "valid": valid, "audit": "fabricated" if valid else "output differs: fabricated"}

    def close(self):
        pass


def small_settings(**kw):
    """Reference and naive, 64 MiB, pools 1 and 2, batches 8 and 32, one warm-up and two measured rounds."""
    base = dict(impls=["reference", "naive"], models=["mlp-64mib"], pools=[1, 2], batches=[8, 32], rounds=2, warmup=1)
    base.update(kw)
    return Settings(**base)


def run_fake(tmp_path, runner=None, settings=None, name="r.json"):
    """A whole matrix through ``runner`` (a default FakeRunner); returns the file and the document."""
    s = settings or small_settings()
    doc = bench.new_document(s, infos(s.impls), ["test"])
    out = tmp_path / name
    bench.run_matrix(doc, runner or FakeRunner(), out, stream=io.StringIO())
    return out, doc
