"""The conformance suite as pytest tests: one test per registered check, each judged by the one executor.

Run it with the zcbench plugin (installed with zcbench)::

    pytest --pyargs zcbench.suites.test_conformance --zc-impl reference -k outputs

Test ids are the check ids (``test_check[zero_copy.bytes_in_store]``) so ``-k`` and
expected-failure prefixes read the same.
"""

from __future__ import annotations

import pytest

from zcbench.suites.plugin import settle
from zcbench.suites.registry import all_checks

CHECKS = all_checks()


@pytest.mark.parametrize("check", [pytest.param(c, id=c.id, marks=pytest.mark.zc_check(c)) for c in CHECKS])
def test_check(check, zc_verdict) -> None:
    settle(zc_verdict)
