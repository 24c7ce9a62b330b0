"""The pytest-benchmark module: it collects against any implementation, and one real shape runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from zcbench.harness import bench_load
from zcbench.suites import models


TESTS = ("test_load", "test_first_forward", "test_second_forward", "test_steady_forward", "test_metadata_floor")


def _pytest(*args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    # Not an xdist worker's environment: pytest-benchmark turns itself off under xdist.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    full_env = {**inherited, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **env}
    cmd = [sys.executable, "-m", "pytest", "--pyargs", "zcbench.harness.bench_load", "-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd="/")


def test_collects_five_benchmarks_per_shape_for_any_implementation():
    done = _pytest("--zc-impl", "naive", "--collect-only", "-q")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    ids = [line for line in done.stdout.splitlines() if "::test_" in line]
    assert len(ids) == len(TESTS) * len(models.MODEL_SETS['scale']) + 1
    assert any(line.endswith("::test_first_use") for line in ids)
    for shape in models.MODEL_SETS['scale']:
        for test in TESTS:
            assert any(line.endswith(f"{test}[{shape}]") for line in ids), (test, shape)


def test_the_clock_records_only_what_it_is_told():
    clock = bench_load.ActorClock()
    before = clock()
    clock.advance(0.0015)
    assert clock() - before == pytest.approx(0.0015)


def test_one_shape_against_the_reference_writes_in_actor_times(tmp_path):
    out = tmp_path / "bench.json"
    done = _pytest("--zc-impl", "reference", "-k", "(tensors-500 and not tensors-5000) or first_use", "-q",
                   f"--benchmark-json={out}", ZCBENCH_BENCH_ROUNDS="1")  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    found = {b["name"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert set(found) == {f"{t}[tensors-500]" for t in TESTS} | {"test_first_use"}
    first = found["test_first_use"]
    parts = first["extra_info"]["store_get_s"] + first["extra_info"]["tensor_s"]
    assert first["group"] == "first use" and len(parts) == 2 and all(0 < p < 5 for p in parts), first["extra_info"]
    assert first["stats"]["median"] == pytest.approx(sum(parts))
    load = found["test_load[tensors-500]"]
    assert load["group"] == "tensors-500" and load["extra_info"]["implementation"] == "reference"
    assert load["extra_info"]["num_tensors"] == 500 and "ActorClock" in load["options"]["timer"]
    # the recorded time is the actor's, not the driver's round trip (which starts a process: seconds)
    assert 0 < load["stats"]["median"] < load["extra_info"]["driver_s"][0]
    steady = found["test_steady_forward[tensors-500]"]["extra_info"]
    # The same weights in shared and in private memory: a wide bound (this is a test, not the benchmark).
    assert len(steady["speed_vs_private"]) == 1 and 0.5 < steady["speed_vs_private"][0] < 2.0, steady
