"""Scale measurements without Ray: model shapes, per-node store metrics, the scaling plots and table.

Report inputs are fabricated results files, so what is tested is the bookkeeping and the
plotting, never a measurement.
"""

from __future__ import annotations

import copy

import pytest
import torch
from zcbench.harness import bench, cells, floor, report, schema
from zcbench.suites import models
from zcbench.harness.matrix import MatrixError, Settings, expand_models, resolve_model, validate
from zcbench.harness.metrics import metric_meta
from zcbench.suites import probes

MiB = 2**20


@pytest.mark.parametrize("n", [1, 50, 2000])
def test_tensors_n_resolves_and_builds_n_small_tensors(n):
    case = resolve_model(f"tensors-{n}")
    model = case.build()
    params = list(model.parameters())
    assert case.name == f"tensors-{n}"
    assert len(params) == n
    assert all(p.numel() == 1024 and p.dtype == torch.float32 for p in params)
    assert probes.model_bytes(model) == n * 4096
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
    assert metric_meta("store_bytes_node12") == ("B", "none")
    assert metric_meta("num_tensors") == ("tensors", "none")


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
             "metadata_floor_s": 2e-6 * n,
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
    assert {"load_vs_tensor_count.png", "load_vs_bytes.png", "store_bytes_per_node.png"} <= names
    for name in ("load_vs_tensor_count.png", "load_vs_bytes.png", "store_bytes_per_node.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    md = (tmp_path / "report.md").read_text()
    assert "load_vs_tensor_count.png" in md and "store_bytes_per_node.png" in md
    table = md[md.index("## Load time vs shape"):]
    # per-tensor cost: tensors-5000 reference loads in 0.001*sqrt(5000) s = 70.7 ms -> 14.1 us per tensor; floor 10 ms
    assert "| reference | tensors-5000 | 5000 | 19.5 | 70.71 | 10.00 | 14.1 | 7.1 |" in table


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


def test_scale_set_has_the_five_shapes_by_tensor_count():
    names = expand_models(["scale"])
    assert names == list(models.MODEL_SETS['scale'])
    counts = {n: sum(1 for _ in probes.named_tensors(resolve_model(n).build())) for n in ("tensors-500", "linears-2000")}
    assert counts == {"tensors-500": 500, "linears-2000": 4000}  # tensors-N is the registry's, tested there
    with torch.device("meta"):  # 384 MiB is not built for real here
        wide = models.Wide()
    assert len(list(wide.parameters())) == 12
    assert sum(p.numel() * 4 for p in wide.parameters()) // 2**20 == 384


def test_metadata_floor_builds_views_of_the_same_storages():
    model = resolve_model("linears-2000").build()
    specs = floor.tensor_specs(model)
    views = floor.build_views(specs)
    assert len(views) == 4000
    for (t, is_param), v in zip(specs, views):
        assert v.data_ptr() == t.data_ptr() and v.shape == t.shape and isinstance(v, torch.nn.Parameter) == is_param
    assert 0 < floor.metadata_floor_s(model) < 1.0
