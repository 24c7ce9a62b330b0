"""The three ways into the conformance suite: the pytest plugin, run_checks, the matrix.

Plugin runs go through real ``pytest`` subprocesses (pytester), so the entry point,
options, header and outcomes are exactly what a user sees. Fake implementations live
in the pytester directory, which is the subprocess's working directory and so also on
its Ray workers' path.
"""

from __future__ import annotations

import json

import pytest

from zcbench.suites import xfails

pytest_plugins = ["pytester"]

CHECK = "outputs.mixed_model"
CONFORMANCE = ["--pyargs", "zcbench.suites.test_conformance", "-rA"]

FAKES = '''
import copy

import torch

from zcbench.suites.contract import Capabilities
from zcbench.suites.implementations.reference import ReferenceImpl


class NoCpu(ReferenceImpl):
    """Declares no capability at all: every check must be skipped, nothing loaded."""

    name = "nocpu"
    capabilities = Capabilities(cpu=False)


class Noisy(ReferenceImpl):
    """Broken on purpose: each actor perturbs a private copy of the weights."""

    name = "noisy"

    def load(self, wrapped, device="cpu"):
        model = copy.deepcopy(super().load(wrapped, device))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3)
        return model
'''


@pytest.fixture
def fake_dir(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makepyfile(fakeimpl=FAKES)
    monkeypatch.delenv("ZCBENCH_IMPL", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    return pytester


@pytest.fixture
def address(ray_session) -> str:
    """The session's cluster: plugin runs attach to it (--zc-ray-address) instead of starting their own."""
    return ray_session.get_runtime_context().gcs_address


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*CONFORMANCE, *args, timeout=600)


def xfails_file(pytester: pytest.Pytester, text: str) -> str:
    return str(pytester.makefile(".txt", xfails=text))


# --- usage errors -------------------------------------------------------------------


def test_missing_impl_is_a_usage_error(fake_dir: pytest.Pytester) -> None:
    result = run(fake_dir, "-k", CHECK)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*zcbench: the conformance suite needs an implementation: pass --zc-impl*ZCBENCH_IMPL*"])


def test_bad_spec_is_a_usage_error(fake_dir: pytest.Pytester) -> None:
    result = run(fake_dir, "--zc-impl", "fakeimpl:Missing")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*zcbench: implementation spec 'fakeimpl:Missing': module 'fakeimpl' has no 'Missing'*"])
    result = run(fake_dir, "--zc-impl", "no-such-impl")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*unknown implementation 'no-such-impl'*reference*"])


def test_xfails_line_without_reason_is_an_error(fake_dir: pytest.Pytester) -> None:
    path = xfails_file(fake_dir, "# known\n\noutputs.mixed_model # fine\nzero_copy.\n")
    result = run(fake_dir, "--zc-impl", "fakeimpl:NoCpu", "--zc-xfails", path)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*xfails.txt:4: 'zero_copy.' has no reason*"])


# --- capability skip, stale entries, header (no Ray needed) -----------------------


def test_undeclared_capability_skips_and_stale_entry_warns(fake_dir: pytest.Pytester) -> None:
    path = xfails_file(fake_dir, "no_such_property.check # stale on purpose\n")
    result = run(fake_dir, "--zc-impl", "fakeimpl:NoCpu", "--zc-xfails", path, "-k", CHECK)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        [
            "zcbench implementation: nocpu *(fakeimpl:NoCpu)",
            "zcbench capabilities: cpu=False, cuda=False*",
            "zcbench suite * fingerprint *; torch *, ray *, python *, hypothesis * profile *",
            f"zcbench expected failures: {path}",
            "*zcbench warnings*",
            "expected failure 'no_such_property.check' in * matches no check",
            "SKIPPED*capability cpu not declared by nocpu",
        ]
    )


# --- outcomes against real actors ------------------------------------------------


def test_reference_passes_with_header(fake_dir: pytest.Pytester, address: str) -> None:
    result = run(fake_dir, "--zc-ray-address", address, "--zc-impl", "reference", "--zc-profile", "thorough", "-k", CHECK)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "zcbench implementation: reference * (zcbench.suites.implementations.reference:ReferenceImpl)",
            "zcbench capabilities: cpu=True, cuda=True, task_mode=True*write_policy=cow*",
            "*profile zcbench-thorough",
            "zcbench expected failures: none",
            f"PASSED*test_check?{CHECK}?",
        ]
    )


def test_expected_failure_that_passes_is_xpass_and_fails_when_strict(fake_dir: pytest.Pytester, address: str) -> None:
    path = xfails_file(fake_dir, "outputs. # pretend outputs differ\n")
    result = run(fake_dir, "--zc-ray-address", address, "--zc-impl", "reference", "--zc-xfails", path, "-k", CHECK)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(xpassed=1)
    result = run(fake_dir, "--zc-ray-address", address, "--zc-impl", "reference", "--zc-xfails", path, "--zc-strict", "-k", CHECK)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*XPASS(strict)*pretend outputs differ*"])


def test_broken_impl_fails_and_xfails_when_expected(fake_dir: pytest.Pytester, address: str) -> None:
    result = run(fake_dir, "--zc-ray-address", address, "--zc-impl", "fakeimpl:Noisy", "--zc-select", CHECK)
    result.assert_outcomes(failed=1, deselected=None)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    path = xfails_file(fake_dir, f"{CHECK} # noisy perturbs its weights\n")
    result = run(fake_dir, "--zc-ray-address", address, "--zc-impl", "fakeimpl:Noisy", "--zc-xfails", path, "--zc-select", CHECK)
    result.assert_outcomes(xfailed=1)
    result.stdout.fnmatch_lines(["XFAIL*noisy perturbs its weights*"])


# --- errors are errors ------------------------------------------------------------

BROKEN_RAY = """
import zcbench.suites.session as session


def _refuse(self):
    raise RuntimeError("The current node timed out during startup")


session.Session._start_once = _refuse
session.START_ATTEMPTS = 1
"""


def test_ray_that_does_not_start_is_an_error_even_when_a_failure_is_expected(fake_dir: pytest.Pytester) -> None:
    fake_dir.makeconftest(BROKEN_RAY)
    path = xfails_file(fake_dir, f"{CHECK} # would absorb a failure, never an error\n")
    result = run(fake_dir, "--zc-impl", "reference", "--zc-xfails", path, "--zc-select", CHECK)
    result.assert_outcomes(errors=1, deselected=None)
    result.stdout.fnmatch_lines(["*ERROR*test_check?outputs.mixed_model?*", "*Ray did not start*timed out during startup*"])


# --- the matrix ----------------------------------------------------------------------


def test_matrix_writes_json_and_markdown(tmp_path, address: str) -> None:
    from zcbench.harness import conformance, schema
    from zcbench.suites import executor, fingerprint

    matrix = conformance.run_matrix(
        ["reference", "fakeimpl:NoSuch"], tmp_path, select=[CHECK], timeout_s=600, ray_address=address
    )
    on_disk = schema.load(tmp_path / "matrix.json", kind="matrix")
    assert on_disk == json.loads(json.dumps(matrix, default=str))
    assert on_disk["suite_fingerprint"] == fingerprint.current() and on_disk["complete"]
    ref = on_disk["implementations"]["reference"]
    assert ref["status"] == "ok" and ref["header"]["implementation"] == "reference"
    assert [r["check_id"] for r in ref["results"]] == [c.id for c in executor.select_checks([CHECK])]
    assert ref["counts"]["pass"] == 1 and ref["provenance"]["retries"] == 0
    broken = on_disk["implementations"]["fakeimpl:NoSuch"]
    assert broken["status"] == "crashed" and "fakeimpl" in broken["reason"]
    md = (tmp_path / "matrix.md").read_text()
    assert "| check | reference | fakeimpl:NoSuch |" in md
    assert f"| `{CHECK}` | pass | not run (crashed) |" in md
    assert "**fakeimpl:NoSuch** ?: no checks" in md and "run CRASHED" in md
    assert oct((tmp_path / "matrix.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def test_matrix_runs_implementations_concurrently_and_keeps_their_order(tmp_path, monkeypatch, capsys) -> None:
    import threading
    import time

    from zcbench.harness import conformance

    both_running = threading.Barrier(2, timeout=30)  # broken (an error) unless the two runs overlap

    def run_one(name, **kw):
        both_running.wait()
        if name == "reference":
            time.sleep(0.3)  # finishes last, yet its column comes first
        return {"implementation": name, "status": "ok", "header": None, "results": [], "warnings": [],
                "counts": conformance.counts([]), "provenance": {"commit": None, "dirty": None}}  # fmt: skip

    monkeypatch.setattr(conformance, "run_one", run_one)
    monkeypatch.setattr(conformance, "write", lambda matrix, out_dir: None)
    matrix = conformance.run_matrix(["reference", "naive"], tmp_path, select=[CHECK], jobs=2)
    assert list(matrix["implementations"]) == ["reference", "naive"] and matrix["complete"]
    assert "conformance: 2 to do, about " in capsys.readouterr().err  # an estimate before the first verdict
    with pytest.raises(ValueError, match="private cluster per implementation"):
        conformance.run_matrix(["reference", "naive"], tmp_path, jobs=2, ray_address="127.0.0.1:1")


def test_a_killed_matrix_ends_its_subprocesses_and_keeps_what_was_judged(tmp_path) -> None:
    """kill -TERM of ``zcbench conformance`` ends like Ctrl-C: every implementation's subprocess dies with it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = f"""
import sys, time
from zcbench.harness import cli, conformance
def run_one(name, **kw):
    child = conformance._Child(["sleep", "600"], {{}}, lambda line: None)
    print(child.proc.pid, flush=True)
    child.wait(600)
conformance.run_one = run_one
sys.exit(cli.main(["conformance", "--impl", "reference", "--out", {str(tmp_path)!r}]))
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted; what was judged is kept in" in err
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{child}"):
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}"), "the implementation's subprocess outlived the killed matrix"
    assert (tmp_path / "matrix.json").exists()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_xfails_parsing() -> None:
    parsed = xfails.parse("# c\n\nzero_copy. # naive copies\nzero_copy.bytes_in_store  #  exact\n")
    assert parsed == {"zero_copy.": "naive copies", "zero_copy.bytes_in_store": "exact"}
    assert xfails.reason_for("zero_copy.bytes_in_store", parsed) == "exact"
    assert xfails.reason_for("zero_copy.other", parsed) == "naive copies"
    assert xfails.reason_for("outputs.mixed_model", parsed) is None
    assert xfails.unmatched(parsed, ["zero_copy.other"]) == ["zero_copy.bytes_in_store"]
    for bad, msg in [("a.b\n", "1: 'a.b' has no reason"), ("x # r\n\na b # r\n", "3: cannot read"), ("a # r\na # s\n", "listed twice")]:
        with pytest.raises(xfails.ExpectedFailuresError, match=msg):
            xfails.parse(bad)


def test_the_timed_gate_lets_runs_on_only_when_the_batch_is_quiet_one_at_a_time() -> None:
    import threading
    import time

    from zcbench.harness.conformance import TimedGate

    gate, log = TimedGate(["a", "b", "c"]), []

    def arrive(name: str, hold_s: float) -> None:
        gate.arrive(name)
        log.append(f"{name} in")
        time.sleep(hold_s)
        log.append(f"{name} out")
        gate.end(name)

    ta = threading.Thread(target=arrive, args=("a", 0.1))
    ta.start()
    time.sleep(0.2)
    assert log == []  # b and c are still in their untimed checks
    gate.end("c")  # c crashed before its timed checks
    time.sleep(0.1)
    assert log == []  # b still runs
    tb = threading.Thread(target=arrive, args=("b", 0.0))
    tb.start()
    ta.join(2)
    tb.join(2)
    assert log == ["a in", "a out", "b in", "b out"]  # one at a time, in the batch's order
    late = TimedGate(["x"])
    late.end("x")  # a run killed while it waited: arrive returns, and lets nobody in after it
    late.arrive("x")
    assert late.passed is None


def test_with_jobs_the_implementations_run_in_batches_behind_a_timed_gate(tmp_path, monkeypatch) -> None:
    from zcbench.harness import conformance
    from zcbench.suites.executor import select_checks

    order = [c.id for c in select_checks(None)]
    assert any(c.timed for c in select_checks(None)), "no timed check is registered: this test proves nothing"
    calls = []

    def run_one(name, *, select, gate, **kw):
        calls.append((name, select, None if gate is None else gate.order))
        if gate is not None:
            gate.end(name)
        timed_last = sorted(order, key=lambda cid: cid == "scale.many_tensors")
        return {"implementation": name, "status": "ok", "reason": None, "header": {"version": "1"}, "warnings": [], "counts": {},
                "results": [{"check_id": cid, "status": "pass"} for cid in timed_last],
                "provenance": {"commit": "c", "dirty": False, "started": "s", "finished": "f", "retries": 0, "duration_s": 1.0}}  # fmt: skip

    monkeypatch.setattr(conformance, "run_one", run_one)
    monkeypatch.setattr(conformance, "write", lambda matrix, out_dir: None)
    matrix = conformance.run_matrix(["reference", "naive", "torch-mmap"], tmp_path, jobs=2)
    assert sorted(calls) == [("naive", None, ["reference", "naive"]), ("reference", None, ["reference", "naive"]), ("torch-mmap", None, ["torch-mmap"])]
    assert calls[-1][0] == "torch-mmap"  # the second batch starts after the first
    assert [r["check_id"] for r in matrix["implementations"]["naive"]["results"]] == order  # the registry's order again
    calls.clear()
    conformance.run_matrix(["reference"], tmp_path, jobs=2)
    conformance.run_matrix(["reference", "naive"], tmp_path, jobs=1)
    assert [g for *_, g in calls] == [None, None, None]  # nothing runs beside: no gate
