"""The harness without Ray: schema, matrix loop (interleaving, resume, failures), compare, report, CLI errors.

Cells are measured by a fake runner whose figures are fabricated but deterministic, so
what is tested is the harness's bookkeeping, never a measurement.
"""

from __future__ import annotations

import io
import json
import sys

import _benchfakes as fakes  # the tests folder is on sys.path
import pytest
from zcbench.harness import bench, cli, compare, report, schema
from zcbench.harness.stats import percentile, summarize

MiB = 2**20


def test_complete_run_validates_and_has_stats(tmp_path):
    out, _ = fakes.run_fake(tmp_path)
    doc = schema.load(out)
    assert doc["complete"] and len(doc["cells"]) == 8
    cell = next(c for c in doc["cells"] if c["id"] == "reference|mlp-64mib|cpu|pool2|batch32")
    thr = cell["metrics"]["throughput_rows_s"]
    assert cell["status"] == "ok" and cell["validity"] == "VALID" and cell["rounds"] == 2
    assert thr["stats"]["n"] == 2 and len(thr["values"]) == 2 and thr["stats"]["min"] <= thr["value"] <= thr["stats"]["max"]
    ratio = cell["metrics"]["throughput_vs_naive"]
    naive = next(c for c in doc["cells"] if c["id"] == "naive|mlp-64mib|cpu|pool2|batch32")
    paired = [a / b for a, b in zip(thr["values"], naive["metrics"]["throughput_rows_s"]["values"])]
    assert ratio["values"] == pytest.approx(paired) and ratio["stats"]["n"] == 2  # one ratio per round, paired
    assert cell["metrics"]["speed_vs_naive"]["value"] == pytest.approx(1.25)  # naive's p50 over the reference's
    assert doc["suite_fingerprint"] and doc["schema_version"] == 2


def test_implementations_interleave_and_warmup_runs(tmp_path):
    runner = fakes.FakeRunner()
    fakes.run_fake(tmp_path, runner, fakes.small_settings(pools=[1], batches=[8], rounds=2, warmup=1))
    # 1 warm-up + 2 measured rounds, the order reversing every round: A B, B A, A B
    assert [impl for impl, _ in runner.calls] == ["reference", "naive", "naive", "reference", "reference", "naive"]


def test_failed_and_invalid_cells_are_marked(tmp_path):
    out, _ = fakes.run_fake(tmp_path, fakes.FakeRunner(fail={"naive"}, invalid={"reference"}))
    doc = schema.load(out)
    for c in doc["cells"]:
        if c["params"]["impl"] == "naive":
            assert c["status"] == "failed" and "boom" in c["error"] and c["metrics"] == {}
        else:
            assert c["status"] == "ok" and c["validity"] == "INVALID" and "differs" in c["audit"]
            assert "throughput_vs_naive" not in c["metrics"]
    assert report.verdicts(doc)["reference"]["verdict"] == "INVALID"


def test_interrupt_keeps_finished_cells_and_resume_completes(tmp_path):
    s = fakes.small_settings()
    doc = bench.new_document(s, fakes.infos(), ["test"])
    out = tmp_path / "r.json"
    # 6 calls per matrix point (2 impls x 3 rounds): interrupt in the middle of the third point
    with pytest.raises(KeyboardInterrupt):
        bench.run_matrix(doc, fakes.FakeRunner(interrupt_at=15), out, stream=io.StringIO())
    saved = schema.load(out)
    status = {c["id"]: c["status"] for c in saved["cells"]}
    assert not saved["complete"]
    assert sum(v == "ok" for v in status.values()) == 4
    missing = [c for c in saved["cells"] if c["status"] == "missing"]
    assert len(missing) == 4 and all("--resume" in c["error"] for c in missing)
    finished = {c["id"]: c["metrics"] for c in saved["cells"] if c["status"] == "ok"}

    runner = fakes.FakeRunner(slow=2.0)
    bench.run_matrix(saved, runner, out, stream=io.StringIO())
    done = schema.load(out)
    assert done["complete"] and all(c["status"] == "ok" for c in done["cells"])
    assert len(runner.calls) == 2 * 6  # only the two unfinished points were measured again
    for c in done["cells"]:
        if c["id"] in finished:
            assert c["metrics"]["load_cold_s"] == finished[c["id"]]["load_cold_s"]
    assert {p["pool"] for _, p in runner.calls} == {2}


def test_cuda_cells_of_cpu_only_implementations_are_skipped(tmp_path):
    infos = fakes.infos()
    infos[1]["capabilities"]["cuda"] = True
    s = fakes.small_settings(devices=["cuda"], pools=[1], batches=[8])
    doc = bench.new_document(s, infos, ["test"])
    bench.run_matrix(doc, fakes.FakeRunner(), tmp_path / "r.json", stream=io.StringIO())
    by = {c["params"]["impl"]: c for c in schema.load(tmp_path / "r.json")["cells"]}
    assert by["reference"]["status"] == "skipped" and "CUDA" in by["reference"]["error"]
    assert by["naive"]["status"] == "ok"


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d.pop("machine"), "machine"),
        (lambda d: d["cells"][0].update(status="great"), "cells/0/status"),
        (lambda d: d["cells"][0]["metrics"]["wrap_s"].pop("unit"), "cells/0/metrics/wrap_s"),
        (lambda d: d.pop("suite_fingerprint"), "suite_fingerprint"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d["cells"][0].update(status="failed", error=None), "cells/0"),
    ],
)
def test_schema_rejects_invalid_files(tmp_path, mutate, where):
    out, _ = fakes.run_fake(tmp_path)
    doc = json.loads(out.read_text())
    mutate(doc)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(schema.ResultsError, match=where.split("/")[0] if "/" in where else where):
        schema.load(bad)
    assert cli.main(["report", str(bad), "--out", str(tmp_path / "rep")]) == cli.EXIT_BAD_INPUT


def test_not_json_and_missing_files_are_clear_errors(tmp_path, capsys):
    junk = tmp_path / "junk.json"
    junk.write_bytes(b"\x80\x04\x95 pickle-ish")
    with pytest.raises(schema.ResultsError, match="not JSON"):
        schema.load(junk)
    assert cli.main(["compare", str(junk), str(tmp_path / "nope.json")]) == cli.EXIT_BAD_INPUT
    assert "not JSON" in capsys.readouterr().err


def _scaled(doc, factor_throughput):
    doc = json.loads(json.dumps(doc))
    for c in doc["cells"]:
        if "throughput_rows_s" in c["metrics"]:
            c["metrics"]["throughput_rows_s"]["value"] *= factor_throughput
    return doc


def test_compare_flags_regressions_by_factor(tmp_path):
    _, a = fakes.run_fake(tmp_path)
    b = _scaled(a, 0.5)
    result = compare.compare(a, b, 1.2)
    flagged = {(r.cell, r.metric) for r in result.regressions}
    assert ("reference|mlp-64mib|cpu|pool1|batch8", "throughput_rows_s") in flagged
    assert all(m == "throughput_rows_s" for _, m in flagged)
    assert not compare.compare(a, _scaled(a, 0.9), 1.2).regressions  # within the factor
    assert not compare.compare(a, _scaled(a, 2.0), 1.2).regressions  # faster is no regression
    b["machine"]["cpu_model"] = "Other CPU"
    text = compare.render(compare.compare(a, b, 1.2), "a", "b", 1.2)
    assert "REGRESSION" in text and "cpu_model" in text and "differ in machine" in text


def test_compare_cli_exit_codes(tmp_path):
    out_a, a = fakes.run_fake(tmp_path, name="a.json")
    b_path = tmp_path / "b.json"
    schema.write_atomic(b_path, _scaled(a, 0.5))
    assert cli.main(["compare", str(out_a), str(b_path)]) == 0
    assert cli.main(["compare", str(out_a), str(b_path), "--fail-on-regression"]) == 1
    assert cli.main(["compare", str(out_a), str(out_a), "--fail-on-regression"]) == 0


def test_report_writes_markdown_and_pngs(tmp_path):
    out, _ = fakes.run_fake(tmp_path, fakes.FakeRunner(invalid={"naive"}))
    rep = tmp_path / "rep"
    assert cli.main(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    pngs = sorted(p.name for p in rep.glob("*.png"))
    assert pngs == ["load_vs_model_size.png", "memory_vs_pool_mlp-64mib.png", "throughput_vs_batch_mlp-64mib.png"]
    for p in rep.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
    assert "| reference | 0.0-test | **VALID**" in md and "| naive | 0.0-test | **INVALID**" in md
    assert "![memory_vs_pool_mlp-64mib](memory_vs_pool_mlp-64mib.png)" in md
    assert "STALE" not in md  # measured (fabricated) with the current suite's fingerprint
    head = md[md.index("## Headline"):md.index("## Steady-state")]
    rows = {line.split("|")[1].strip(): line.split("|")[4].strip() for line in head.splitlines() if line.startswith("| ") and "batch 32" in line}
    assert rows["reference (batch 32)"].startswith("1.06") and rows["naive (batch 32)"].startswith("2.00")  # one copy vs one per actor
    assert "| reference | mlp-64mib | 2 | 32 |" in md[md.index("## Steady-state"):]  # the shared/private ratio table


def test_report_with_zero_results_fails(tmp_path, capsys):
    out, _ = fakes.run_fake(tmp_path, fakes.FakeRunner(fail={"reference", "naive"}))
    assert cli.main(["report", str(out), "--out", str(tmp_path / "rep")]) == cli.EXIT_BAD_INPUT
    assert "no finished" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--impl", "no-such-impl"], "unknown implementation"),
        (["--model", "resnet-9000"], "unknown model"),
        (["--model", "mlp-4096mib"], "1..1024"),
        (["--pool", "3"], "pool size"),
        (["--batch", "7"], "batch size"),
        (["--device", "tpu"], "device"),
        (["--rounds", "0"], "rounds"),
        (["--ray-address", "127.0.0.1:1"], "does not answer"),
        (["--ray-address", "nonsense"], "host:port"),
    ],
)
def test_cli_bad_input_is_a_clear_error(tmp_path, capsys, argv, message):
    out = tmp_path / "never.json"
    assert cli.main(["run", "--impl", "reference", "--out", str(out), *argv]) == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_cli_cuda_without_gpu_is_an_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["run", "--impl", "reference", "--device", "cuda"]) == cli.EXIT_BAD_INPUT
    assert "CUDA" in capsys.readouterr().err


FAKE_WORKER = r"""
import json, sys, time
print(json.dumps({"ok": True, "ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    if req["params"]["batch"] == 1:
        sys.exit(3)          # a killed worker
    time.sleep(60)           # a hung cell
"""


def test_subprocess_runner_survives_dead_and_hung_workers():
    runner = bench.SubprocessRunner({"x": {}}, command=[sys.executable, "-c", FAKE_WORKER])
    try:
        died = runner.run("x", {"batch": 1}, {"rows": 1, "files": 1}, timeout_s=30)
        assert not died["ok"] and "worker died" in died["error"] and "code 3" in died["error"]
        hung = runner.run("x", {"batch": 8}, {"rows": 1, "files": 1}, timeout_s=1)
        assert not hung["ok"] and "cell timeout" in hung["error"]
        assert not runner.workers  # the hung one was killed, not kept
    finally:
        runner.close()


def test_stats():
    st = summarize([3, 1, 2, 10])
    assert st["median"] == 2.5 and st["min"] == 1 and st["max"] == 10 and st["n"] == 4 and st["iqr"] == st["q3"] - st["q1"] > 0
    assert summarize([5])["iqr"] == 0
    assert percentile([1, 2, 3, 4, 5], 50) == 3 and percentile([1, 2], 100) == 2


def test_cli_run_quick_and_resume_with_a_fake_runner(tmp_path, monkeypatch):
    runners = []

    def fake(envs, ray_address=None, **kw):
        runners.append(fakes.FakeRunner(interrupt_at=5 if not runners else None))
        runners[-1].envs = envs
        return runners[-1]

    monkeypatch.setattr(bench, "SubprocessRunner", fake)
    out = tmp_path / "quick.json"
    argv = ["run", "--quick", "--impl", "reference", "--impl", "naive", "--rounds", "2", "--out", str(out)]
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    first = schema.load(out)
    assert first["settings"]["quick"] and first["settings"]["impls"] == ["reference", "naive"]
    assert first["settings"]["models"] == ["mlp-256mib"] and first["settings"]["pools"] == [2, 1]
    assert {i["name"] for i in first["implementations"]} == {"reference", "naive"}
    assert not first["complete"] and sum(c["status"] == "ok" for c in first["cells"]) == 2
    assert cli.main(["run", "--resume", str(out)]) == 0
    done = schema.load(out)
    assert done["complete"] and done["run_id"] == first["run_id"] and len(done["cells"]) == 4
    assert len(runners[1].calls) == 1 * 2 * 2  # one point left, two impls, two rounds
    # the throughput point (pool 2) gets rows for 20 steady batches per actor; pool 1 only its loads and memory
    steady, load_only = runners[0].jobs[0], runners[1].jobs[0]
    assert steady["steady"] and steady["rows"] >= 2 * (2 + 20) * 8 and steady["rows"] % 8 == 0 and steady["warmup_calls"] == 2
    assert not load_only["steady"] and load_only["rows"] == 1 * 4 * 8


def test_quick_matrix_takes_every_installed_implementation():
    settings = cli.settings_from_args(cli.build_parser(load_conformance=False).parse_args(["run", "--quick"]))
    assert settings.impls[:2] == ["reference", "naive"]
    assert set(settings.impls) >= {"reference", "naive", "ray-builtin", "ray-zerocopy", "torch-mmap"}


def test_model_sets_expand_and_harness_shapes_resolve():
    args = cli.build_parser(load_conformance=False).parse_args(["run", "--model", "scale", "--model", "bert-base,tensors-500"])
    settings = cli.settings_from_args(args)
    assert settings.models == ["wide-384mib", "tensors-500", "linears-2000", "tensors-5000", "tensors-20000", "bert-base"]


def test_conformance_subcommand_gets_its_options():
    args = cli.build_parser(load_conformance=True).parse_args(["conformance", "--impl", "reference"])
    assert args.impl == ["reference"] and args.profile == "ci"
    assert cli.build_parser(load_conformance=False).parse_args(["report", "x", "--out", "y"]).command == "report"
