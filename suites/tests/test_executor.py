"""The executor's statuses and reasons, without and with Ray: fail vs error, retries, readable reasons.

The error path is proven with an injected Ray start-up failure: the check is reported as
an error, retried once on a fresh cluster, and never counted as a failure.
"""

from __future__ import annotations

import json

import pytest
import ray.exceptions as rex

from zcbench.suites import executor, session, verdicts
from zcbench.suites.errors import InfrastructureError
from zcbench.suites.registry import Check, SkipCheck

CHECK = "outputs.mixed_model"


class FakeSession:
    """Stands in for the Ray session: counts starts and restarts, can refuse to start."""

    def __init__(self, fail_starts: int = 0, fail_restart: bool = False):
        self.fail_starts, self.fail_restart = fail_starts, fail_restart
        self.starts = self.restarts = 0
        self.pools: dict = {}
        self.started = True

    def start(self) -> None:
        self.starts += 1
        if self.fail_starts:
            self.fail_starts -= 1
            raise InfrastructureError("Ray did not start: The current node timed out during startup")

    def restart(self) -> None:
        self.restarts += 1
        if self.fail_restart:
            raise InfrastructureError("Ray did not start: still down")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    """An executor whose cluster is a FakeSession and whose store and hosts are not touched."""
    from zcbench.suites import hosts, probes

    made = FakeSession()
    monkeypatch.setattr(executor.Executor, "session", lambda self: made)
    monkeypatch.setattr(probes, "store_bytes", lambda: 0)
    monkeypatch.setattr(executor.Executor, "_clean_up", staticmethod(lambda start_bytes: None))
    monkeypatch.setattr(hosts, "forget_touched", lambda: None)
    return made


def _impl():
    return executor.resolve("reference")


def test_statuses_of_plain_checks(fake) -> None:
    impl = _impl()

    def boom(_impl):
        assert 1 == 2, "weights differ\nsecond line"

    def skip(_impl):
        raise SkipCheck("not on this machine")

    failed = executor.Executor().execute(Check("x.boom", boom), impl)
    assert (failed.status, failed.attempts) == ("fail", 1)
    assert failed.reason.startswith("weights differ second line")  # one line (pytest may append its own text)
    assert "AssertionError" in failed.traceback
    assert executor.Executor().execute(Check("x.boom", boom), impl, expected_reason="known").status == "xfail"
    passed = executor.Executor().execute(Check("x.ok", lambda _i: {"n": 1}), impl, expected_reason="known")
    assert passed.status == "xpass" and "expected to fail (known)" in passed.reason
    strict = executor.Executor().execute(Check("x.ok", lambda _i: None), impl, expected_reason="known", strict=True)
    assert strict.status == "fail" and "[strict]" in strict.reason
    skipped = executor.Executor().execute(Check("x.skip", skip), impl)
    assert (skipped.status, skipped.reason) == ("skip", "not on this machine")
    undeclared = executor.Executor().execute(Check("x.gpu", boom, requires=("task_mode", "nonexistent_flag")), impl)
    assert (undeclared.status, undeclared.reason) == ("skip", "capability nonexistent_flag not declared by reference")


def test_probe_actors_start_a_few_checks_ahead_and_never_during_a_timed_check(fake, monkeypatch) -> None:
    from zcbench.suites import hosts

    asked: list = []
    monkeypatch.setattr(hosts, "prestart", lambda impl, counts: asked.append(dict(counts)))
    monkeypatch.setattr(hosts, "wait_for_starts", lambda: asked.append("quiet"))
    impl = _impl()
    plan = [Check(f"x.c{i}", lambda _i: None, hosts={"head": n}) for i, n in enumerate([1, 2, 1, 1, 16])]
    timed = Check("x.timed", lambda _i: None, hosts={"head": 1}, timed=True)
    plan.insert(4, timed)
    ex = executor.Executor()
    ex.prepare(impl, plan)
    assert asked == [{"head": 2}]  # the first LOOKAHEAD checks only, not the 16 of the last one
    for c in plan:
        ex.execute(c, impl)
    # each check's own actors first, and up; then the next ones, looking no further than a timed
    # check, which only waits for what is starting; c4 then starts its 16
    own = lambda n: [{"head": n}, "quiet"]  # noqa: E731
    assert asked[1:] == [*own(1), {"head": 2}, *own(2), {"head": 2}, *own(1), {"head": 1}, *own(1), {"head": 1},
                         "quiet", *own(16), {"head": 16}]  # fmt: skip


def test_held_timed_checks_run_last_once_the_hold_returns(fake, monkeypatch) -> None:
    from zcbench.suites import hosts

    monkeypatch.setattr(hosts, "prestart", lambda impl, counts: None)
    monkeypatch.setattr(hosts, "wait_for_starts", lambda: None)
    log: list[str] = []
    plan = [Check("x.a", lambda _i: log.append("a")), Check("x.t1", lambda _i: log.append("t1"), timed=True),
            Check("x.b", lambda _i: log.append("b")), Check("x.t2", lambda _i: log.append("t2"), timed=True)]  # fmt: skip
    monkeypatch.setattr(executor, "select_checks", lambda select: list(plan))
    results = executor.run_checks("reference", hold_timed=lambda: log.append("hold"))
    assert log == ["a", "b", "hold", "t1", "t2"]  # held once, before the first timed check
    assert [r.check_id for r in results] == ["x.a", "x.b", "x.t1", "x.t2"]
    log.clear()
    executor.run_checks("reference")
    assert log == ["a", "t1", "b", "t2"]  # without a hold: the registry's order


def test_a_run_whose_every_check_is_skipped_starts_no_cluster(fake) -> None:
    undeclared = [Check(f"x.c{i}", lambda _i: None, requires=("nonexistent_flag",)) for i in range(2)]
    ex = executor.Executor()
    ex.prepare(_impl(), undeclared)
    assert [ex.execute(c, _impl()).status for c in undeclared] == ["skip", "skip"]
    assert fake.starts == 0
    ex.prepare(_impl(), [*undeclared, Check("x.ok", lambda _i: None)])
    assert fake.starts == 1


def test_hardware_absent_is_a_skip_that_says_so(fake) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = executor.Executor().execute(Check("x.gpu", lambda _i: None, requires=("cuda",), needs=("cuda",)), _impl())
    assert (result.status, result.reason) == ("skip", "no CUDA device on this machine")


def test_injected_ray_start_failure_is_an_error_retried_once_then_passes(fake) -> None:
    fake.fail_starts = 1
    result = executor.Executor().execute(Check("x.ok", lambda _i: {"ran": True}), _impl())
    assert (result.status, result.attempts, result.observations) == ("pass", 2, {"ran": True})
    assert "timed out during startup" in result.first_error
    assert fake.restarts == 1


def test_persistent_start_failure_stays_an_error_never_a_failure(fake) -> None:
    fake.fail_starts = 10
    result = executor.Executor().execute(Check("x.ok", lambda _i: None), _impl(), expected_reason="known to fail")
    assert (result.status, result.attempts) == ("error", 2)  # an expected failure does not absorb an error
    assert result.reason.startswith("InfrastructureError: Ray did not start")


def test_a_cluster_that_cannot_restart_errors_the_rest_at_once(fake) -> None:
    fake.fail_starts, fake.fail_restart = 1, True
    ex = executor.Executor()
    first = ex.execute(Check("x.a", lambda _i: None), _impl())
    second = ex.execute(Check("x.b", lambda _i: None), _impl())
    assert first.status == second.status == "error"
    assert "could not be restarted" in second.reason and second.attempts == 0


def test_an_infrastructure_error_inside_a_check_is_retried(fake) -> None:
    calls = []

    def flaky(_impl):
        calls.append(1)
        if len(calls) == 1:
            raise rex.NodeDiedError("node 1.2.3.4 died")
        return None

    result = executor.Executor().execute(Check("x.flaky", flaky), _impl())
    assert result.status == "pass" and result.attempts == 2 and len(calls) == 2
    assert result.first_error.startswith("NodeDiedError")


def test_check_time_limit_is_an_error(fake) -> None:
    import time

    result = executor.Executor().execute(Check("x.slow", lambda _i: time.sleep(5), timeout_s=0.2), _impl())
    assert result.status == "error" and "did not finish within" in result.reason


def _remote(cause: BaseException, traceback_str: str) -> BaseException:
    return rex.RayTaskError("Host.load", traceback_str, cause, pid=1, ip="10.0.0.1").as_instanceof_cause()


def test_reasons_unwrap_ray_and_drop_colour_codes() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/x/zcbench/suites/hosts.py", line 95, in load\n'
        '  File "/x/site-packages/ray_zerocopy/wrapper.py", line 10, in load\n'
        "TypeError: Got unsupported ScalarType BFloat16"
    )
    exc = _remote(TypeError("Got unsupported ScalarType BFloat16"), tb)
    assert "\x1b[" in str(exc)  # Ray colours its prefix
    assert verdicts.reason(exc) == "TypeError: Got unsupported ScalarType BFloat16"
    assert verdicts.classify(exc) == "fail"  # the implementation's own frame raised it
    assert verdicts.clean("\x1b[36mray::Host.apply()\x1b[39m (pid=12, ip=1.2.3.4, actor_id=ab) boom") == "boom"
    long = verdicts.reason(AssertionError("x" * 500))
    assert len(long) == verdicts.REASON_LIMIT and long.endswith("…")


def test_a_probe_crash_is_our_error_not_the_implementations() -> None:
    tb = (
        "Traceback (most recent call last):\n"
        '  File "/x/suites/hosts.py", line 120, in residency\n'
        '  File "/x/suites/probes.py", line 140, in residency\n'
        '  File "/x/site-packages/torch/storage.py", line 5, in data_ptr\n'
        "KeyError: 'x'"
    )
    assert verdicts.classify(_remote(KeyError("x"), tb)) == "error"
    model_tb = tb.replace("suites/probes.py", "suites/models.py")  # the model's own code, on loaded weights
    assert verdicts.classify(_remote(RuntimeError("dtype mismatch"), model_tb)) == "fail"


def test_machine_deaths_are_errors_code_deaths_are_failures() -> None:
    oom = rex.ActorDiedError()
    oom.error_msg = "The actor died unexpectedly. Task was killed due to the node running low on memory."
    assert verdicts.classify(oom) == "error"
    crash = rex.ActorDiedError()
    crash.error_msg = "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR (segfault)"
    assert verdicts.classify(crash) == "fail"
    assert verdicts.classify(rex.RuntimeEnvSetupError("pip failed")) == "error"
    assert verdicts.classify(InfrastructureError("probe actors did not start")) == "error"


def test_run_checks_records_are_json(ray_session) -> None:
    (passed,) = executor.run_checks("reference", select=[CHECK])
    assert (passed.check_id, passed.property, passed.status, passed.attempts) == (CHECK, "outputs", "pass", 1)
    assert passed.duration_s > 0 and passed.traceback is None
    json.dumps(passed.to_dict())
    with pytest.warns(executor.StaleExpectedFailures, match="nope"):
        (xpassed,) = executor.run_checks("reference", select=[CHECK], expected_failures={"outputs.": "x", "nope": "y"})
    assert xpassed.status == "xpass" and xpassed.expected_failure == "x"


def test_injected_start_failure_through_the_real_session(ray_session, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real Session, shut down, then refusing to start twice (the run's start, the check's first attempt):
    the check errors once and passes on the retry, on a fresh cluster."""
    real = session.Session._start_once
    refusals = [1, 1]

    def flaky_start(self):
        if refusals:
            refusals.pop()
            raise RuntimeError("The current node timed out during startup")
        return real(self)

    current = session.current()
    current.shutdown()
    monkeypatch.setattr(session.Session, "_start_once", flaky_start)
    monkeypatch.setattr(session, "START_ATTEMPTS", 1)
    (result,) = executor.run_checks("reference", select=[CHECK])
    assert (result.status, result.attempts) == ("pass", 2), result
    assert "timed out during startup" in result.first_error


def test_select_and_driver_env(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="matches no check"):
        executor.select_checks(["no_such_property."])
    import ray  # noqa: F401  (the point: ray is already imported)

    from zcbench.suites.contract import Capabilities

    impl = executor.resolve("reference")
    monkeypatch.setattr(impl, "capabilities", Capabilities(worker_env={"ZCBENCH_TEST_FLAG": "1"}))
    monkeypatch.delenv("ZCBENCH_TEST_FLAG", raising=False)
    with pytest.raises(executor.DriverEnvError, match="ZCBENCH_TEST_FLAG=1 .*zcbench conformance"):
        executor.apply_driver_env(impl)
