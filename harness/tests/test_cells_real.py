"""One real round of a cell for reference and naive, in the session's Ray cluster.

Proves the measuring path on real actors and the real Ray Data pipeline: the audit
passes, every row goes through, and the memory figures tell sharing from copying
(naive's pool holds one private copy per actor; the reference's holds the store copy once).
"""

from __future__ import annotations

import pytest

from zcbench.harness import cells
from zcbench.suites.contract import load_implementation

MiB = 2**20
MODEL_MIB = 32


@pytest.fixture(scope="module")
def measured(ray_session, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    params = {"model": f"mlp-{MODEL_MIB}mib", "device": "cpu", "pool": 2, "batch": 8}
    return {
        name: cells.measure(load_implementation(name), {"impl": name, **params}, rows=32, seed=0, workdir=work)
        for name in ("reference", "naive")
    }


def test_real_cell_is_valid_and_complete(measured):
    for name, out in measured.items():
        assert out["valid"], f"{name}: {out['audit']}"
        m = out["metrics"]
        assert set(cells.METRICS) - {"throughput_vs_naive", "load_cold_remote_s"} <= set(m), f"{name} lacks metrics"
        assert m["throughput_rows_s"] > 0 and 0 < m["latency_p50_s"] <= m["latency_p99_s"]
        assert m["model_bytes"] >= MODEL_MIB * MiB * 0.99


def test_memory_figures_tell_sharing_from_copying(measured):
    ref, naive = measured["reference"]["metrics"], measured["naive"]["metrics"]
    size = ref["model_bytes"]
    assert ref["store_bytes"] >= 0.95 * size  # one copy in the node's store
    assert ref["actor_store_pss_bytes"] > 0.2 * size  # actors really map store pages
    # each naive actor owns the weights privately: about one model more USS per actor
    assert naive["actor_uss_infer_bytes"] - ref["actor_uss_infer_bytes"] > 0.7 * size
    assert naive["pool_uss_sum_bytes"] - ref["pool_uss_sum_bytes"] > 2 * 0.7 * size
