"""The three ways into the conformance suite: the pytest plugin, run_checks, the matrix.

Plugin runs go through real ``pytest`` subprocesses (pytester), so the entry point,
options, header and outcomes are exactly what a user sees. Fake implementations live
in the pytester directory, which is the subprocess's working directory and so also on
its Ray workers' path.
"""

from __future__ import annotations

import json

import pytest

from zcbench.suites import runner, xfails
from zcbench.suites.contract import Capabilities
from zcbench.suites.registry import Check, SkipCheck

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
            "zcbench suite *; torch *, ray *, python *, hypothesis * profile *",
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
            "zcbench capabilities: cpu=True, cuda=False, task_mode=True*write_policy=cow*",
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


# --- run_checks and the matrix ---------------------------------------------------


def test_run_checks_records(ray_session) -> None:
    (passed,) = runner.run_checks("reference", select=[CHECK])
    assert (passed.check_id, passed.property, passed.status) == (CHECK, "outputs", "passed")
    assert passed.duration_s > 0 and passed.traceback is None
    assert set(passed.to_dict()) >= {"check_id", "property", "status", "reason", "duration_s", "observations", "traceback"}
    json.dumps(passed.to_dict())

    with pytest.warns(runner.StaleExpectedFailures, match="nope"):
        (xpassed,) = runner.run_checks("reference", select=["outputs.mixed"], expected_failures={"outputs.": "x", "nope": "y"})
    assert xpassed.status == "xpassed" and xpassed.expected_failure == "x"
    (strict,) = runner.run_checks("reference", select=[CHECK], expected_failures={CHECK: "x"}, strict=True)
    assert strict.status == "failed" and "[strict]" in strict.reason


def test_execute_classifies_without_ray() -> None:
    impl = runner.resolve("reference")

    def boom(_impl):
        assert 1 == 2, "weights differ\nsecond line"

    def skip(_impl):
        raise SkipCheck("not on this machine")

    failed = runner.execute(Check("x.boom", boom), impl)
    assert failed.status == "failed" and failed.reason == "weights differ" and "AssertionError" in failed.traceback
    assert runner.execute(Check("x.boom", boom), impl, expected_reason="known").status == "xfailed"
    skipped = runner.execute(Check("x.skip", skip), impl)
    assert (skipped.status, skipped.reason) == ("skipped", "not on this machine")
    gpu = runner.execute(Check("x.gpu", boom, requires=("cuda",)), impl)
    assert (gpu.status, gpu.reason) == ("skipped", "capability cuda not declared by reference")
    assert runner.header(impl)["capabilities"] == impl.capabilities.as_dict()
    with pytest.raises(ValueError, match="matches no check"):
        runner.select_checks(["no_such_property."])


def test_driver_env_refused_after_ray_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray  # noqa: F401  (the point: ray is already imported)

    impl = runner.resolve("reference")
    monkeypatch.setattr(impl, "capabilities", Capabilities(worker_env={"ZCBENCH_TEST_FLAG": "1"}))
    monkeypatch.delenv("ZCBENCH_TEST_FLAG", raising=False)
    with pytest.raises(runner.DriverEnvError, match="ZCBENCH_TEST_FLAG=1 .*zcbench conformance"):
        runner.apply_driver_env(impl)


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


def test_matrix_writes_json_and_markdown(tmp_path, address: str) -> None:
    from zcbench.harness import conformance

    matrix = conformance.run_matrix(
        ["reference", "fakeimpl:NoSuch"], tmp_path, select=[CHECK], timeout_s=600, ray_address=address
    )
    on_disk = json.loads((tmp_path / "matrix.json").read_text())
    assert on_disk["schema_version"] == conformance.SCHEMA_VERSION == matrix["schema_version"]
    assert on_disk["suite_version"] and on_disk["machine"]["cores_logical"] and on_disk["created"]
    ref = on_disk["implementations"]["reference"]
    assert ref["status"] == "ok" and ref["header"]["implementation"] == "reference"
    assert [r["check_id"] for r in ref["results"]] == [c.id for c in runner.select_checks([CHECK])]
    assert {r["status"] for r in ref["results"]} == {"passed"}
    broken = on_disk["implementations"]["fakeimpl:NoSuch"]
    assert broken["status"] == "crashed" and "fakeimpl" in broken["reason"]
    md = (tmp_path / "matrix.md").read_text()
    assert "| check | reference | fakeimpl:NoSuch |" in md
    assert f"| `{CHECK}` | pass | crashed |" in md
    assert "**fakeimpl:NoSuch**: CRASHED" in md
