"""The conformance suite as pytest tests: one test per registered check.

Run it with the zcbench plugin (installed with zcbench)::

    pytest --pyargs zcbench.suites.test_conformance --zc-impl reference -k outputs

Test ids are the check ids (``test_check[zero_copy.bytes_in_store]``) so ``-k`` and
expected-failure prefixes read the same.
"""

from __future__ import annotations

import pytest

from zcbench.suites.registry import SkipCheck, all_checks
from zcbench.suites.runner import capability_skip_reason

CHECKS = all_checks()


@pytest.mark.parametrize(
    "check", [pytest.param(c, id=c.id, marks=pytest.mark.zc_check(c)) for c in CHECKS]
)
def test_check(check, zc_impl, request, record_property) -> None:
    skip = capability_skip_reason(check, zc_impl)
    if skip:
        pytest.skip(skip)
    request.getfixturevalue("zc_ray")  # only checks that run start the cluster
    try:
        observations = check.fn(zc_impl)
    except SkipCheck as exc:
        pytest.skip(str(exc) or "skipped by the check")
    if isinstance(observations, dict):
        record_property("observations", observations)
