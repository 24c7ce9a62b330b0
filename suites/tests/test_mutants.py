"""Negative controls: the suite catches every deliberately broken mutant of the reference.

A check that passes a mutant cannot see the defect the mutant has, so each mutant is
run through the suite's own runner (the same path third parties use) and must fail
the checks of the property it breaks, with a one-line reason.
"""

from __future__ import annotations

import pytest

from zcbench.suites.mutants import MUTANTS
from zcbench.suites.runner import run_checks

#: For each mutant, the checks that must fail (all within the property it breaks).
MUST_FAIL = {
    "mutant-copies-on-load": ["zero_copy.bytes_in_store", "zero_copy.second_actor_private_memory"],
    "mutant-drops-buffer": ["fidelity.metadata"],
    "mutant-unties-weights": ["fidelity.tied_weights"],
    "mutant-upcasts-bf16": ["fidelity.dtypes"],
    "mutant-leaks-object": ["lifetime.release_after_use"],
    "mutant-writes-through": ["isolation.classify_writes"],
    "mutant-loses-layout": ["fidelity.layout"],
}


def test_every_mutant_has_expectations():
    assert set(MUST_FAIL) == set(MUTANTS)
    for name, checks in MUST_FAIL.items():
        assert all(c.startswith(MUTANTS[name].breaks + ".") for c in checks), name


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_mutant_is_caught(ray_session, name):
    results = {r.check_id: r for r in run_checks(MUTANTS[name].spec, select=MUST_FAIL[name])}
    assert set(results) == set(MUST_FAIL[name]), f"checks not run: {set(MUST_FAIL[name]) - set(results)}"
    for check_id, result in results.items():
        assert result.status == "failed", f"{name} was not caught by {check_id}: {result.status} {result.reason}"
        assert result.reason and "\n" not in result.reason, f"{check_id}: reason must be one line: {result.reason!r}"
