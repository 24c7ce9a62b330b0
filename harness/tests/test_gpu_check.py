"""harness/gpu_check.py without a GPU: models, readings' parsers, decisions, verdicts, report; CUDA parts skip.

The decisions get fabricated numbers shaped like an H200 run (a 384 MiB model, 500 MiB
contexts), so what is tested is the judging, never a measurement.
"""

from __future__ import annotations

import json

import pytest
import torch

from zcbench.harness import gpu_check as gc

MiB = 2**20
MODEL = 384 * MiB


def test_models_have_the_tensor_counts_the_check_names():
    sizes = gc.Sizes(big_width=64)
    assert gc.tensor_count(gc.build("big12", sizes)) == 12
    assert gc.tensor_count(gc.build("many5000", sizes)) == 5000
    exact = gc.build("exact", sizes)
    assert exact.head.weight is exact.embed.weight and exact.mid.weight.dtype == torch.bfloat16
    assert gc.storage_bytes(gc.build("big12", gc.GPU_SIZES)) == 6 * (4096 * 4096 + 4096) * 4  # ~384 MiB
    with pytest.raises(ValueError):
        gc.build("nope", sizes)


def test_models_are_deterministic_and_run_on_the_cpu():
    sizes = gc.Sizes(big_width=32)
    for name in gc.MODELS:
        a, b = gc.build(name, sizes), gc.build(name, sizes)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        with torch.no_grad():
            assert gc.first_difference(gc._to_cpu(a(*gc.inputs(name, sizes))), gc._to_cpu(b(*gc.inputs(name, sizes)))) is None
    out = gc.build("exact", sizes)(*gc.inputs("exact", sizes))
    assert out["hidden_bf16"].dtype == torch.bfloat16 and out["logits"].dtype == torch.float32


def test_first_difference():
    a = torch.arange(4.0)
    assert gc.first_difference(a.clone(), a) is None
    assert "values differ in 1 elements" in gc.first_difference(a + torch.tensor([0, 0, 1.0, 0]), a)
    assert "torch.bfloat16" in gc.first_difference(a.bfloat16(), a)
    assert "keys" in gc.first_difference({"x": a}, {"y": a})
    assert gc.first_difference({"x": a}, {"x": a.clone()}) is None


def test_nvidia_smi_parsers():
    assert gc.parse_compute_apps("1234, 512\n99, [N/A]\n\n") == {1234: 512 * MiB, 99: None}
    assert gc.parse_compute_apps("") == {}
    assert gc.parse_used("1024\n") == 1024 * MiB and gc.parse_used("[N/A]") is None and gc.parse_used("") is None
    off = gc.GpuMemory(enabled=False)
    assert off.source == "none" and off.processes() is None and off.used() is None


def test_one_copy_decision():
    ctx = 500 * MiB
    assert gc.one_copy_problem(MODEL, [2 * MiB] * 4, MODEL + 4 * MiB, MODEL + ctx + 20 * MiB, ctx) is None
    assert "4 of 4 actors allocated their own copy" in gc.one_copy_problem(MODEL, [MODEL] * 4, None, 4 * MODEL, ctx)
    assert "the owner holds" in gc.one_copy_problem(MODEL, [0] * 4, 2 * MODEL, None, None)
    assert "device memory grew" in gc.one_copy_problem(MODEL, [0] * 4, MODEL, 2 * MODEL + ctx, ctx)
    assert gc.one_copy_problem(MODEL, [0] * 4, None, None, None) is None  # nothing but the allocations readable


def test_baseline_and_outputs_decisions():
    assert gc.private_copies_problem(MODEL, [MODEL] * 4) is None
    assert "hold less than the model" in gc.private_copies_problem(MODEL, [MODEL, 0, MODEL, MODEL])
    assert gc.outputs_problem([None, None], [True, True]) is None
    assert "1 of 2 actors differ (actor 1: x)" == gc.outputs_problem([None, "x"])
    assert "tied weights came apart" in gc.outputs_problem([None], [False])


@pytest.mark.parametrize(
    ("error", "writer", "other", "observed"),
    [(None, True, True, "shared"), ("RuntimeError: no", False, False, "raise"), (None, True, False, "private"),
     (None, False, False, "ignored")],
)
def test_write_classification(error, writer, other, observed):
    assert gc.classify_write(error, writer, other) == observed


def test_write_policy_judgement():
    assert gc.write_problem("shared", "shared") is None  # the reference on a GPU: declared, so it passes
    assert gc.write_problem("cow", "private") is None and gc.write_problem("copy", "private") is None
    assert "declared write_policy 'cow'" in gc.write_problem("cow", "shared")
    assert gc.write_problem("unknown", "shared") is not None


def test_owner_death_and_release_decisions():
    assert gc.model_lost_problem({"error": "ModelLostError: gone", "model_lost": True, "seconds": 0.7}) is None
    assert "load succeeded" in gc.model_lost_problem({"error": None})
    assert "not ModelLostError" in gc.model_lost_problem({"error": "RayActorError: x", "model_lost": False})
    assert "only after" in gc.model_lost_problem({"error": "e", "model_lost": True, "seconds": 99.0})
    assert gc.recovery_problem({"error": None, "difference": None}) is None
    assert "failed" in gc.recovery_problem({"error": "ModelLostError: x"})
    assert gc.release_problem([], 1000 * MiB, 990 * MiB, owners_while_held=1) is None
    assert "still on the GPU" in gc.release_problem([4321], None, None)
    assert "above where it was" in gc.release_problem([], 1500 * MiB, 1000 * MiB)
    assert "exited while a consumer" in gc.release_problem([], None, None, owners_while_held=0)


def _fabricated_run() -> dict:
    ctx = 500 * MiB
    big = {"cuda": True, "tensors": 12, "model_bytes": MODEL, "load_s": [2.1, 0.012, 0.011, 0.013],
           "nvml": [ctx + 2 * MiB] * 4, "differences": [None] * 4}
    return {
        "status": "running", "device": "cuda", "sizes": {"big_width": 4096}, "memory_source": "nvml",
        "machine": {"gpu": "NVIDIA H200", "torch": "2.11.0+cu130", "cuda": "13.0", "ray": "2.60.0", "python": "3.12.3"},
        "pools": {
            "reference": {
                "baseline": False, "context_bytes": ctx,
                "big12": {**big, "allocated": [0] * 4, "owners": [{"pid": 7, "allocated": MODEL, "nvml": MODEL + ctx}],
                          "growth": MODEL + ctx + 8 * MiB},
                "exact": {"differences": [None] * 4, "ties": [True] * 4},
                "write": {"declared": "shared", "observed": "shared", "writer_error": None},
                "many5000": {"tensors": 5000, "load_s": [3.0, 2.5, 2.4, 2.6], "differences": [None, None]},
                "release": {"measured": True, "owners_while_one_consumer_left": 2, "leftover": [],
                            "used_before": 2000 * MiB, "used_after": 2010 * MiB, "seconds": 5.2},
                "owner_death": {"recovery": {"error": None, "difference": None},
                                "lost": {"error": "ModelLostError: gone", "model_lost": True, "seconds": 0.8}},
            },
            "naive": {
                "baseline": True, "context_bytes": ctx,
                "big12": {**big, "allocated": [MODEL] * 4, "owners": [], "growth": 4 * MODEL, "load_s": [0.5, 0.4, 0.4, 0.4]},
                "exact": {"differences": [None] * 4, "ties": [True] * 4},
                "write": {"declared": "copy", "observed": "private", "writer_error": None},
                "many5000": {"tensors": 5000, "load_s": [1.0, 0.9], "error": "stopped: time budget"},
                "release": {"measured": True, "leftover": [], "used_before": 2000 * MiB, "used_after": 1500 * MiB, "seconds": 1.0},
            },
        },
    }


def test_verdicts_figures_and_report_of_a_good_run():
    result = gc.finish(_fabricated_run())
    v = result["verdicts"]
    assert {k for k, x in v.items() if x["ok"] is False} == set()
    assert v["naive.outputs_5000"]["ok"] is None  # stopped by the budget: not measured, not failed
    assert v["reference.owner_death_model_lost"]["text"] == "ModelLostError after 0.8 s"
    assert result["status"] == "partial"  # one verdict was not measured on a GPU run
    fig = result["figures"]
    assert fig["VRAM at pool 4"].startswith("reference: allocated per actor 0/0/0/0 MiB, NVML per actor 502/502/502/502 MiB, "
                                            "owner 384 MiB allocated / 884 MiB NVML")
    assert "naive: allocated per actor 384/384/384/384 MiB" in fig["VRAM at pool 4"]
    assert fig["load time, 12 tensors"] == "reference first 2100 ms, then median 12 ms | naive first 500 ms, then median 400 ms"
    assert "stopped: time budget" in fig["load time, 5000 tensors"]
    md = gc.markdown(result)
    assert md.startswith("# GPU check: NVIDIA H200 (torch 2.11.0+cu130") and "| `reference.one_copy` | pass" in md


def test_a_broken_run_fails():
    run = _fabricated_run()
    run["pools"]["reference"]["big12"]["allocated"] = [MODEL] * 4  # every actor copied
    run["pools"]["reference"]["write"]["observed"] = "private"
    run["pools"]["reference"]["release"]["leftover"] = [7]
    result = gc.finish(run)
    failed = {k for k, x in result["verdicts"].items() if x["ok"] is False}
    assert failed == {"reference.one_copy", "reference.write_policy", "reference.released"}
    assert result["status"] == "failed" and result["problems"]["reference.released"].endswith("[7]")
    assert "**FAIL**" in gc.markdown(result)
    crashed = gc.finish({"status": "running", "device": "cuda", "pools": {"reference": {"error": "TypeError: x"}}})
    assert crashed["status"] == "failed" and crashed["verdicts"]["reference.run"]["ok"] is False


def test_budget_with_a_fake_clock():
    now = [100.0]
    budget = gc.Budget(60, clock=lambda: now[0])
    assert budget.allows(60) and not budget.allows(61)
    now[0] += 45
    assert budget.left() == 15 and not budget.allows(30)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_nothing_is_measured(tmp_path):
    assert gc.main(["--out", str(tmp_path), "--allow-no-cuda"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["status"] == "skipped" and "no CUDA" in result["reason"]
    assert (tmp_path / "gpu_check.md").read_text().startswith("# GPU check: no GPU")
    assert gc.main(["--out", str(tmp_path)]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_gpu_check_on_a_gpu(tmp_path):
    assert gc.main(["--out", str(tmp_path), "--width", "1024", "--budget-s", "240"]) == 0
