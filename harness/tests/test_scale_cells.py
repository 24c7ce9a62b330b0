"""Scale measurements (issue 5) without Ray: tensors-N models, per-node store metrics, the two scale plots.

Report inputs are fabricated results files, so what is tested is the bookkeeping and the
plotting, never a measurement.
"""

from __future__ import annotations

import copy

import pytest
import torch

from zcbench.harness import bench, cells, report, schema
from zcbench.harness.matrix import MatrixError, Settings, resolve_model, validate

MiB = 2**20


@pytest.mark.parametrize("n", [1, 50, 2000])
def test_tensors_n_resolves_and_builds_n_small_tensors(n):
    case = resolve_model(f"tensors-{n}")
    model = case.build()
    params = list(model.parameters())
    assert case.name == f"tensors-{n}"
    assert len(params) == n
    assert all(p.numel() == 1024 and p.dtype == torch.float32 for p in params)
    assert cells.model_bytes(model) == n * 4096
    (x,) = case.inputs()
    assert x.shape[1] == 1024  # the pipeline's input width, like the blob MLPs
    assert case.run(model).shape == (x.shape[0], n)


def test_tensors_n_is_deterministic_and_outputs_depend_on_every_tensor():
    case = resolve_model("tensors-50")
    a, b = case.build(), case.build()
    base = case.run(a)
    assert torch.equal(base, case.run(b))
    for i, p in enumerate(b.parameters()):
        saved = p.detach().clone()
        with torch.no_grad():
            p.add_(1.0)
        changed = case.run(b)
        with torch.no_grad():
            p.copy_(saved)  # exact restore (add then subtract can round)
        diff = (changed != base).any(dim=0)
        assert diff[i], f"tensor {i} does not shape the output"
        assert diff.sum() == 1, f"tensor {i} changed other outputs than its own column"


@pytest.mark.parametrize("name", ["tensors-0", "tensors-20001", "tensors-x", "tensors--5"])
def test_bad_tensor_counts_are_rejected(name):
    with pytest.raises(MatrixError):
        resolve_model(name)


def test_validate_accepts_tensor_models():
    validate(Settings(impls=["reference"], models=["tensors-50", "tensors-5000"], pools=[1], batches=[8]))


def test_per_node_metrics_order_driver_first_and_never_negative():
    before = {"b-node": 100, "a-node": 50, "drv": 10}
    after = {"b-node": 100 + 4 * MiB, "a-node": 40, "drv": 10 + 4 * MiB, "new": 7}
    m = cells.per_node_metrics(before, after, "drv")
    assert m == {"num_nodes": 4, "store_bytes_node0": 4 * MiB, "store_bytes_node1": 0, "store_bytes_node2": 4 * MiB,
                 "store_bytes_node3": 7}
    assert cells.metric_meta("store_bytes_node12") == ("B", "none")
    assert cells.metric_meta("num_tensors") == ("tensors", "none")


def _doc(with_tensors: bool, with_nodes: bool) -> dict:
    models = ["mlp-8mib"] + (["tensors-50", "tensors-500", "tensors-5000"] if with_tensors else [])
    s = Settings(impls=["reference", "naive"], models=models, pools=[2], batches=[8], rounds=1, warmup=0)
    infos = [{"name": n, "version": "0", "spec": f"fake:{n}", "capabilities": {"cpu": True}, "process_env": {}}
             for n in s.impls]
    doc = bench.new_document(s, infos, ["test"])
    for c in doc["cells"]:
        p = c["params"]
        n = int(p["model"].split("-")[1]) if p["model"].startswith("tensors-") else 8
        size = n * 4096 if p["model"].startswith("tensors-") else 8 * MiB
        naive = p["impl"] == "naive"
        m = {"model_bytes": size, "num_tensors": n, "load_cold_s": 0.001 * n ** 0.5 * (3 if naive else 1),
             "load_warm_s": 0.0005 * n ** 0.5, "actor_uss_infer_bytes": 100 * MiB, "pool_total_bytes": 300 * MiB,
             "throughput_rows_s": 100.0, "store_bytes": size}
        if with_nodes:
            m.update({"num_nodes": 2, "store_bytes_node0": size * (2 if naive else 1), "store_bytes_node1": size})
        c.update(status="ok", error=None, validity="VALID", rounds=1, metrics={k: bench._metric(k, [v]) for k, v in m.items()})
    doc["complete"] = True
    return doc


def test_report_writes_scale_plots_from_fabricated_results(tmp_path):
    doc = _doc(with_tensors=True, with_nodes=True)
    schema.validate(doc)  # the new metrics keep the file valid
    assert doc["cells"][0]["metrics"]["store_bytes_node1"]["unit"] == "B"
    paths = report.write_report(doc, tmp_path)
    names = {p.name for p in paths}
    assert {"load_vs_tensor_count.png", "store_bytes_per_node.png"} <= names
    for name in ("load_vs_tensor_count.png", "store_bytes_per_node.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (tmp_path / "report.md").read_text()
    assert "load_vs_tensor_count.png" in md and "store_bytes_per_node.png" in md


def test_report_omits_scale_plots_without_such_data(tmp_path):
    paths = report.write_report(_doc(with_tensors=False, with_nodes=False), tmp_path)
    names = {p.name for p in paths}
    assert "load_vs_tensor_count.png" not in names and "store_bytes_per_node.png" not in names
    assert "load_vs_model_size.png" in names


def test_schema_rejects_non_numeric_node_metric():
    doc = _doc(with_tensors=True, with_nodes=True)
    bad = copy.deepcopy(doc)
    bad["cells"][0]["metrics"]["store_bytes_node0"]["value"] = {"node-a": 1}
    with pytest.raises(schema.ResultsError):
        schema.validate(bad)


def test_placement_spreads_the_pool_and_always_times_a_warm_load():
    one, three = ["drv"], ["drv", "b", "c"]
    assert cells.placement(4, one) == (["drv"], ["drv", "drv", "drv"])
    assert cells.placement(1, one) == (["drv"], ["drv"])  # the warm one is surplus, killed after its load
    assert cells.placement(4, three) == (["drv", "b", "c"], ["drv"])
    assert cells.placement(2, three) == (["drv", "b"], ["drv"])  # the surplus warm one must not be a first load
    assert cells.placement(1, three) == (["drv"], ["drv"])
    cold, warm = cells.placement(16, three)
    assert len(cold) + len(warm) == 16 and {n: (cold + warm).count(n) for n in three} == {"drv": 6, "b": 5, "c": 5}
