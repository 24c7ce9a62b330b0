"""The main job's wiring with fakes: conformance of reference and naive, the quick benchmark, the summary, --full."""

from __future__ import annotations

import io

import _benchfakes as fakes_mod  # the tests folder is on sys.path
import pytest
from zcbench.harness import bench, cli, conformance, main_job, matrix, schema


class Pipe(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture
def fakes(monkeypatch, tmp_path):
    """Fake conformance matrix and measuring processes; records what ran and what had been printed by then."""
    stream = Pipe()
    seen: dict = {"conformance": [], "runners": [], "printed_before_conformance": None, "printed_at_calls": [], "invalid": set()}

    def run_matrix(impls, out_dir, **kw):
        seen["conformance"].append((list(impls), out_dir))
        seen["jobs"] = kw.get("jobs", 1)
        seen["printed_before_conformance"] = stream.getvalue()
        cols = {n: {"implementation": n, "status": "ok", "results": [{"status": "pass"}]} for n in impls}
        return {"implementations": cols}

    class Runner(fakes_mod.FakeRunner):
        def run(self, impl, params, job, timeout_s):
            seen["printed_at_calls"].append(stream.getvalue())
            return super().run(impl, params, job, timeout_s)

    def make_runner(envs, ray_address=None, **kw):
        seen["runners"].append(Runner(invalid=seen["invalid"]))
        return seen["runners"][-1]

    monkeypatch.setattr(conformance, "run_matrix", run_matrix)
    monkeypatch.setattr(conformance, "headline", lambda col: f"{col['implementation']}: 38 pass")
    monkeypatch.setattr(bench, "SubprocessRunner", make_runner)
    seen["stream"] = stream
    return seen


def test_quick_profile_runs_conformance_then_the_headline_benchmark(fakes, tmp_path):
    out = tmp_path / "latest"
    rc = main_job.main_job(main_job.JobSettings(out=out), installed=["reference", "naive", "torch-mmap"], stream=fakes["stream"])
    assert rc == 0
    assert fakes["conformance"] == [(["reference", "naive"], out / "conformance")]
    assert fakes["jobs"] == 2  # two private clusters at a time
    doc = schema.load(out / "bench" / "results.json")
    s = doc["settings"]
    assert s["quick"] and s["impls"] == ["reference", "naive", "torch-mmap"] and s["models"] == [matrix.QUICK_MODEL]
    assert s["pools"] == [2, 1] and len(s["batches"]) == 1 and s["rounds"] == 1  # vs pool size, one throughput point
    assert {c["params"]["impl"] for c in doc["cells"]} == {"reference", "naive", "torch-mmap"} and doc["complete"]
    summary = (out / "SUMMARY.md").read_text()
    assert "reference: 38 pass" in summary and "## Headline: mlp-256mib, pool 2" in summary
    for impl in ("reference", "naive", "torch-mmap"):
        assert f"| {impl} (batch 8) |" in summary
    assert (out / "bench" / "report.md").exists() and list((out / "bench").glob("memory_vs_pool_*.png"))
    # the expected duration is printed first, and every round's line while the benchmark runs
    assert "zcbench main (quick): expected about" in fakes["printed_before_conformance"]
    assert "round 1/1: VALID" in fakes["printed_at_calls"][1]


def test_full_prints_its_expected_duration_before_it_starts(fakes, tmp_path):
    rc = main_job.main_job(main_job.JobSettings(out=tmp_path / "full", full=True), installed=["reference"], stream=fakes["stream"])
    assert rc == 0
    before = fakes["printed_before_conformance"]
    assert before.startswith("zcbench main (full): expected about") and (" min " in before or " h " in before)
    doc = schema.load(tmp_path / "full" / "bench" / "results.json")
    assert doc["settings"]["full"] and doc["settings"]["pools"] == [1, 2, 4, 8] and doc["settings"]["batches"] == [1, 8, 32, 128]
    assert len(fakes["runners"][0].calls) == 4 * 4 * 3  # 16 points, three rounds
    assert "benchmark: " in fakes["printed_at_calls"][0]  # the benchmark's own estimate, before its first cell


def test_an_invalid_cell_fails_the_job(fakes, tmp_path):
    fakes["invalid"].add("naive")
    rc = main_job.main_job(main_job.JobSettings(out=tmp_path / "x", conformance=False), installed=["reference", "naive"],
                           stream=fakes["stream"])  # fmt: skip
    assert rc == 1
    assert "INVALID" in (tmp_path / "x" / "SUMMARY.md").read_text()


def test_cli_main_builds_the_settings_and_main_job_does_not_import_cli(monkeypatch, tmp_path):
    got = {}
    monkeypatch.setattr(main_job, "main_job", lambda s: got.setdefault("s", s) and 0)
    assert cli.main(["main", "--out", str(tmp_path), "--full", "--skip-conformance"]) == 0
    s = got["s"]
    assert s.full and not s.conformance and s.benchmark and s.out == tmp_path
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(main_job))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "cli" not in imported


def test_conformance_runs_two_at_a_time_unless_they_share_one_cluster():
    from zcbench.harness import estimate

    assert main_job.conformance_jobs(main_job.JobSettings()) == 2
    assert main_job.conformance_jobs(main_job.JobSettings(ray_address="127.0.0.1:6379")) == 1
    assert main_job.conformance_jobs(main_job.JobSettings(conformance_impls=["reference"])) == 1
    one = estimate.conformance_seconds(1)
    assert one < estimate.conformance_seconds(2, jobs=2) < estimate.conformance_seconds(2, jobs=1) == 2 * one
    assert estimate.conformance_seconds(0) == 0.0
