"""Every check has a negative control, and every control fails its check the way the table says.

Each control runs through the public executor (``run_checks``), in real Ray actors, so
what is proven is exactly what a third party's run would see. Controls of checks that
need hardware this machine lacks are skipped here and run by the prepared GPU check.
"""

from __future__ import annotations

import gc
import re

import pytest

from zcbench.suites import controls, mutants
from zcbench.suites.contract import load_implementation
from zcbench.suites.executor import run_checks
from zcbench.suites.registry import all_checks

CHECKS = {c.id: c for c in all_checks()}
PAIRS = [(cid, ctl) for cid in CHECKS for ctl in controls.controls_of(cid)]


def test_every_check_has_a_control() -> None:
    missing = sorted(cid for cid in CHECKS if not controls.controls_of(cid))
    assert not missing, f"checks without a negative control in suites/controls.py: {missing}"
    unknown = sorted(set(controls.CONTROLS) - set(CHECKS))
    assert not unknown, f"controls for checks that do not exist: {unknown}"


def test_every_control_names_a_mutant_that_follows_the_contract() -> None:
    named = {ctl.mutant for ctls in controls.CONTROLS.values() for ctl in ctls}
    assert named <= set(controls.MUTANTS), f"unknown mutants: {sorted(named - set(controls.MUTANTS))}"
    for name, spec in controls.MUTANTS.items():
        impl = load_implementation(spec)
        assert impl.name == name and impl.spec == spec
        assert impl.capabilities.cpu


@pytest.mark.parametrize(("check_id", "control"), PAIRS, ids=[f"{c}-{ctl.mutant}" for c, ctl in PAIRS])
def test_control_fails_its_check(ray_session, control_outcomes, check_id: str, control: controls.Control) -> None:
    lacking = CHECKS[check_id].missing_hardware()
    if lacking:
        pytest.skip(f"needs CUDA ({lacking}): run by results/gpu/run_gpu_check.sh on a GPU")
    # A missed control gets one more run, and the summary names it with what the missed run saw:
    # a check that catches its mutant only some of the time is then visible in every CI log.
    runs = 2
    result, missed = _run_control(control, check_id), []
    while not _caught(result, control) and len(missed) < runs - 1:
        missed.append(f"run {len(missed) + 1} {_missed_run(result)}")
        result = _run_control(control, check_id)
    if missed:
        control_outcomes.append((check_id, control.mutant, "retried", "; ".join(missed)))
    control_outcomes.append((check_id, control.mutant, result.status))
    assert result.status == "fail", f"{control.mutant} was not caught by {check_id}: {result.status}: {result.reason}"
    assert re.search(control.reason, result.reason), (
        f"{check_id} failed {control.mutant} for another reason than expected ({control.reason!r}): {result.reason}"
    )
    assert "\n" not in result.reason and "\x1b" not in result.reason and len(result.reason) <= 200


def _caught(result, control: controls.Control) -> bool:
    return result.status == "fail" and re.search(control.reason, result.reason or "") is not None


def _missed_run(result) -> str:
    """What a control's missed run saw, for the summary: its status, reason and observations."""
    seen = ", ".join(f"{k} {v}" for k, v in (result.observations or {}).items() if isinstance(v, (int, float, str)))
    return f"{result.status}" + (f": {result.reason}" if result.reason else "") + (f"; {seen}" if seen else "")


def _run_control(control: controls.Control, check_id: str):
    from zcbench.suites import probes

    before = probes.store_bytes()
    try:
        return {r.check_id: r for r in run_checks(control.spec, select=[check_id])}[check_id]
    finally:
        mutants._LEAKED.clear()  # what a leaking mutant kept in this driver
        gc.collect()
        # The store frees those objects asynchronously: the next control must not start on a fuller
        # store than a real run's check would (the executor's own clean-up ran before the clear).
        probes.wait_store_bytes(lambda used: used <= before + 1024 * 1024, 30.0)


def test_the_summary_gathers_the_controls_of_every_xdist_worker() -> None:
    from types import SimpleNamespace

    from zcbench.suites.tests import conftest

    found = [("a.check", "mutant-x", "retried", "run 1 passed"), ("a.check", "mutant-x", "fail"), ("b.check", "mutant-y", "fail")]
    workers = []
    for part in (found[:2], found[2:]):
        config = SimpleNamespace(workeroutput={}, stash=pytest.Stash())
        config.stash[conftest.OUTCOMES] = list(part)
        conftest.pytest_sessionfinish(SimpleNamespace(config=config))
        workers.append(config.workeroutput)
    controller = SimpleNamespace(stash=pytest.Stash())
    conftest.pytest_sessionfinish(SimpleNamespace(config=controller))  # not a worker: hands nothing on
    for output in workers:
        conftest.pytest_testnodedown(SimpleNamespace(config=controller, workeroutput=output), None)
    assert controller.stash[conftest.OUTCOMES] == found
