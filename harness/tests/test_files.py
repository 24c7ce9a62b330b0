"""Result files: the suite fingerprint and STALE marking, old files still readable, permissions, progress lines."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path

import _benchfakes as fakes  # the tests folder is on sys.path
import pytest
from zcbench.harness import bench, report, schema
from zcbench.harness.progress import Progress
from zcbench.harness.stale import current_fingerprint, stale_reason

REPO = Path(__file__).resolve().parents[2]
COMMITTED = sorted(p for p in (REPO / "results" / "bench").rglob("*.json") if p.parent.name != "load-bench")
#: pytest-benchmark's own JSON (``--benchmark-json``), one file per implementation.
LOAD_BENCH = sorted((REPO / "results" / "bench" / "load-bench").glob("*.json"))


def test_new_results_record_the_current_fingerprint(tmp_path):
    out, _ = fakes.run_fake(tmp_path)
    doc = schema.load(out)
    assert doc["suite_fingerprint"] == current_fingerprint() and stale_reason(doc) is None


def test_another_fingerprint_is_stale_in_the_header_and_every_verdict(tmp_path):
    out, _ = fakes.run_fake(tmp_path)
    doc = schema.load(out)
    doc["suite_fingerprint"] = "0123456789abcdef"
    schema.validate(doc)
    md = report.markdown(doc, [])
    assert "**STALE**: measured with suite fingerprint 0123456789abcdef" in md.split("## Verdict")[0]
    verdict_rows = [line for line in md.split("## Verdict")[1].split("##")[0].splitlines() if line.startswith("| ") and "0.0-test" in line]
    assert verdict_rows and all("(STALE)" in row for row in verdict_rows)


def test_old_files_without_a_fingerprint_stay_readable_and_are_stale(tmp_path):
    out, _ = fakes.run_fake(tmp_path)
    doc = json.loads(out.read_text())
    doc["schema_version"] = 1
    del doc["suite_fingerprint"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(doc))
    loaded = schema.load(old)
    assert "no suite fingerprint" in stale_reason(loaded)
    paths = report.write_report(loaded, tmp_path / "rep")
    assert "**STALE**" in paths[0].read_text()


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: p.parent.name + "/" + p.name)
def test_committed_results_are_valid(path):
    doc = schema.load(path)
    assert doc["cells"]


@pytest.mark.parametrize("path", LOAD_BENCH, ids=lambda p: p.name)
def test_committed_load_benchmarks_are_pytest_benchmark_files_timed_in_actors(path):
    doc = json.loads(path.read_text())
    names = {b["name"].split("[")[0] for b in doc["benchmarks"]}
    assert names == {"test_load", "test_first_forward", "test_second_forward", "test_steady_forward", "test_metadata_floor",
                     "test_first_use"}  # fmt: skip
    impl = path.stem
    for b in doc["benchmarks"]:
        if b["name"] == "test_first_use":  # the same for every implementation: a fresh process before any model
            assert "inside a fresh Ray actor" in b["extra_info"]["timing"] and b["stats"]["rounds"] >= 3
            assert len(b["extra_info"]["store_get_s"]) == len(b["extra_info"]["tensor_s"]) == b["stats"]["rounds"]
        elif b["extra_info"]["measure"] != "metadata floor":
            assert b["extra_info"]["implementation"] == impl and "inside a fresh Ray actor" in b["extra_info"]["timing"]
            assert b["stats"]["rounds"] >= 3 and b["stats"]["median"] > 0
        if b["name"].startswith("test_steady_forward"):  # one shared-vs-private ratio per round (fresh actor)
            assert len(b["extra_info"]["speed_vs_private"]) == b["stats"]["rounds"]


def test_result_and_report_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        out, _ = fakes.run_fake(tmp_path)
        paths = report.write_report(schema.load(out), tmp_path / "rep")
    finally:
        os.umask(old)
    for p in [out, *paths]:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


class NotATerminal(io.StringIO):
    """A pipe: every write is kept with how much had been written when it arrived."""

    def isatty(self) -> bool:
        return False


def test_progress_is_plain_flushed_lines_when_not_a_terminal():
    stream = NotATerminal()
    with Progress("benchmark", total=2, expected_s=90, stream=stream) as bar:
        first = stream.getvalue()
        bar.advance("reference round 1: VALID")
        second = stream.getvalue()
        bar.advance("naive round 1: VALID")
    assert "benchmark: 2 to do, about 1:30" in first
    assert "[1/2] benchmark: reference round 1: VALID" in second and "left" in second
    assert stream.getvalue().rstrip().endswith("benchmark: 2 of 2 done in 0s")


def test_the_matrix_reports_each_round_while_it_runs(tmp_path):
    stream = NotATerminal()
    seen_before_call: list[str] = []

    class Watching(fakes.FakeRunner):
        def run(self, impl, params, job, timeout_s):
            seen_before_call.append(stream.getvalue())
            return super().run(impl, params, job, timeout_s)

    s = fakes.small_settings(pools=[1], batches=[8], rounds=2, warmup=0)
    doc = bench.new_document(s, fakes.infos(), ["test"])
    bench.run_matrix(doc, Watching(), tmp_path / "r.json", stream=stream)
    # the line of each round is out before the next round starts
    assert "reference mlp-64mib pool 1 batch 8 round 1/2: VALID" in seen_before_call[1]
    assert seen_before_call[3].count("round ") == 3
    # round 2 runs B A: the reference's line is the last
    assert "[4/4] benchmark: reference mlp-64mib pool 1 batch 8 round 2/2: VALID" in stream.getvalue()


def test_the_schema_describes_every_metric():
    from zcbench.harness.metrics import METRICS

    text = schema.schema()["$defs"]["cell"]["properties"]["metrics"]["description"]
    assert all(f"{name} (" in text for name in METRICS), [n for n in METRICS if f"{n} (" not in text]
