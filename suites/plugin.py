"""pytest plugin (entry point ``zcbench``): run the conformance suite against any implementation.

    pytest --pyargs zcbench.suites.test_conformance --zc-impl reference
    ZCBENCH_IMPL=mypkg.adapter:make pytest --pyargs zcbench.suites --zc-xfails xfails.txt

The plugin is loaded into every pytest run of the environment, so it stays inert (and
never imports ray) unless an implementation is named. ray is imported only after the
implementation's ``worker_env`` is in the environment, since Ray reads some of it at
import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from . import runner, xfails
from .contract import ContractError, Implementation

CONFORMANCE_MODULE = "test_conformance.py"
PROFILES = {"ci": "zcbench-ci", "thorough": "zcbench-thorough"}

_IMPL = pytest.StashKey[Implementation | None]()
_EXPECTED = pytest.StashKey[dict[str, str]]()
_STALE = pytest.StashKey[list[str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zcbench", "zcbench conformance suite")
    group.addoption(
        "--zc-impl",
        metavar="NAME_OR_SPEC",
        help="implementation under test: a registered name, an entry point of group "
        "zcbench.implementations, or package.module:factory (default: $ZCBENCH_IMPL)",
    )
    group.addoption("--zc-xfails", metavar="FILE", help="expected failures: 'CHECK_ID_OR_PREFIX # reason' per line")
    group.addoption("--zc-strict", action="store_true", help="an expected failure that passes fails the run")
    group.addoption("--zc-ray-address", metavar="ADDRESS", help="attach to this Ray cluster instead of starting one")
    group.addoption("--zc-profile", choices=sorted(PROFILES), help="hypothesis profile: ci (fast) or thorough")
    group.addoption(
        "--zc-select",
        action="append",
        metavar="ID_OR_PREFIX",
        help="run only checks whose id equals or starts with this (repeatable)",
    )


def _usage(msg: str) -> pytest.UsageError:
    return pytest.UsageError(f"zcbench: {msg}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "zc_check(check): a zcbench conformance check (set by the suite)")
    profile = config.getoption("--zc-profile")
    if profile:
        os.environ["ZCBENCH_PROFILE"] = PROFILES[profile]
    name = config.getoption("--zc-impl") or os.environ.get("ZCBENCH_IMPL") or None
    impl = None
    if name:
        try:
            impl = runner.resolve(name)
        except (ContractError, runner.DriverEnvError) as exc:
            raise _usage(str(exc)) from exc
    config.stash[_IMPL] = impl
    path = config.getoption("--zc-xfails")
    try:
        config.stash[_EXPECTED] = xfails.load(path) if path else {}
    except xfails.ExpectedFailuresError as exc:
        raise _usage(str(exc)) from exc
    config.stash[_STALE] = []


def pytest_report_header(config: pytest.Config) -> list[str] | None:
    impl = config.stash.get(_IMPL, None)
    if impl is None:
        return None
    h = runner.header(impl, expected_failures=config.getoption("--zc-xfails"))
    caps = ", ".join(f"{k}={v}" for k, v in h["capabilities"].items())
    return [
        f"zcbench implementation: {h['implementation']} {h['version']} ({h['spec']})",
        f"zcbench capabilities: {caps}",
        f"zcbench suite {h['suite_version']}; torch {h['torch']}, ray {h['ray']}, python {h['python']}, "
        f"hypothesis {h['hypothesis']} profile {h['hypothesis_profile']}",
        f"zcbench expected failures: {h['expected_failures'] or 'none'}",
    ]


def _is_conformance(item: pytest.Item) -> bool:
    return Path(str(item.path)).name == CONFORMANCE_MODULE and item.get_closest_marker("zc_check") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    conformance = [i for i in items if _is_conformance(i)]
    if not conformance:
        return
    impl = config.stash.get(_IMPL, None)
    if impl is None:
        raise _usage(
            "the conformance suite needs an implementation: pass --zc-impl NAME_OR_SPEC "
            "(e.g. --zc-impl reference, or package.module:factory) or set ZCBENCH_IMPL"
        )
    from .registry import all_checks

    ids = [c.id for c in all_checks()]
    select = config.getoption("--zc-select")
    if select:
        keep = set(xfails.select(ids, select))
        if not keep:
            raise _usage(f"--zc-select {' '.join(select)} matches no check")
        dropped = [i for i in conformance if i.get_closest_marker("zc_check").args[0].id not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if i not in dropped]
    expected = config.stash[_EXPECTED]
    config.stash[_STALE] = xfails.unmatched(expected, ids)
    strict = config.getoption("--zc-strict")
    for item in items:
        marker = item.get_closest_marker("zc_check")
        if marker is None or not _is_conformance(item):
            continue
        reason = xfails.reason_for(marker.args[0].id, expected)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=strict))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    stale = config.stash.get(_STALE, [])
    if stale:
        terminalreporter.write_sep("=", "zcbench warnings", yellow=True)
        path = config.getoption("--zc-xfails")
        for entry in stale:
            terminalreporter.line(f"expected failure {entry!r} in {path} matches no check", yellow=True)


@pytest.fixture(scope="session")
def zc_impl(pytestconfig: pytest.Config) -> Implementation:
    """The implementation under test (resolved once, in pytest_configure)."""
    impl = pytestconfig.stash.get(_IMPL, None)
    if impl is None:
        raise _usage("no implementation: pass --zc-impl or set ZCBENCH_IMPL")
    return impl


@pytest.fixture(scope="session")
def zc_ray(pytestconfig: pytest.Config) -> Any:
    """One Ray cluster for the whole session (started on first use, never mid-session shut down)."""
    import ray

    from .cluster import ensure_ray

    ensure_ray(pytestconfig.getoption("--zc-ray-address"))
    return ray
