"""pytest plugin (entry point ``zcbench``): run the conformance suite against any implementation.

    pytest --pyargs zcbench.suites.test_conformance --zc-impl reference
    ZCBENCH_IMPL=mypkg.adapter:make pytest --pyargs zcbench.suites --zc-xfails xfails.txt

The plugin is loaded into every pytest run of the environment, so it stays inert (and
never imports ray) unless an implementation is named. Each conformance test hands its
check to the one executor (:mod:`.executor`) and reports the verdict as pytest sees it:
``fail`` fails, ``error`` is an error (in setup: never mistaken for the implementation's
failure, even when an expected-failures entry matches), ``skip`` skips, and expected
failures become ``xfail``/``xpass`` (``--zc-strict``: an unexpected pass fails).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from . import xfails
from .contract import ContractError, Implementation

CONFORMANCE_MODULE = "test_conformance.py"
PROFILES = {"ci": "zcbench-ci", "thorough": "zcbench-thorough"}

_IMPL = pytest.StashKey[Implementation | None]()
_EXPECTED = pytest.StashKey[dict[str, str]]()
_STALE = pytest.StashKey[list[str]]()
_EXECUTOR = pytest.StashKey[Any]()


class ConformanceError(Exception):
    """The check could not run (an infrastructure error): reported by pytest as an error."""


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
        from . import executor

        try:
            impl = executor.resolve(name)
        except (ContractError, executor.DriverEnvError) as exc:
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
    from . import executor

    h = executor.header(impl, expected_failures=config.getoption("--zc-xfails"))
    caps = ", ".join(f"{k}={v}" for k, v in h["capabilities"].items())
    return [
        f"zcbench implementation: {h['implementation']} {h['version']} ({h['spec']})",
        f"zcbench capabilities: {caps}",
        f"zcbench suite {h['suite_version']} fingerprint {h['suite_fingerprint']}; torch {h['torch']}, ray {h['ray']}, "
        f"python {h['python']}, hypothesis {h['hypothesis']} profile {h['hypothesis_profile']}",
        f"zcbench expected failures: {h['expected_failures'] or 'none'}",
    ]


def _check_of(item: pytest.Item) -> Any:
    if Path(str(item.path)).name != CONFORMANCE_MODULE:
        return None
    marker = item.get_closest_marker("zc_check")
    return marker.args[0] if marker is not None else None


@pytest.hookimpl(trylast=True)  # after -k / -m: prestart only what is left to run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    conformance = [i for i in items if _check_of(i) is not None]
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
        dropped = [i for i in conformance if _check_of(i).id not in keep]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = [i for i in items if i not in dropped]
    expected = config.stash[_EXPECTED]
    config.stash[_STALE] = xfails.unmatched(expected, ids)
    strict = config.getoption("--zc-strict")
    chosen = []
    for item in items:
        check = _check_of(item)
        if check is None:
            continue
        chosen.append(check)
        reason = xfails.reason_for(check.id, expected)
        if reason is not None:
            # Only a failure of the implementation can be expected; an error stays an error.
            item.add_marker(pytest.mark.xfail(reason=reason, strict=strict, raises=pytest.fail.Exception))
    from .executor import Executor

    config.stash[_EXECUTOR] = Executor(config.getoption("--zc-ray-address"))
    if chosen:
        config.stash[_EXECUTOR].prepare(impl, chosen)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if session.config.stash.get(_EXECUTOR, None) is not None:
        from .executor import thaw

        thaw()


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


@pytest.fixture
def zc_verdict(request: pytest.FixtureRequest, zc_impl: Implementation, record_property: Any) -> Any:
    """The executor's verdict on this test's check (an error is raised here, so pytest reports it as one)."""
    config = request.config
    check = request.node.callspec.params["check"]
    reason = xfails.reason_for(check.id, config.stash[_EXPECTED])
    result = config.stash[_EXECUTOR].execute(check, zc_impl, expected_reason=reason)
    record_property("zcbench_status", result.status)
    if result.observations:
        record_property("observations", result.observations)
    if result.status == "error":
        first = f" (first attempt: {result.first_error})" if result.first_error else ""
        raise ConformanceError(f"{result.reason}{first}\n\n{result.traceback or ''}")
    return result


def settle(result: Any) -> None:
    """End the conformance test the way its verdict says (called by the test's body)."""
    __tracebackhide__ = True
    if result.status == "skip":
        pytest.skip(result.reason)
    if result.status in ("fail", "xfail"):
        pytest.fail(f"{result.reason}\n\n{result.traceback or ''}".rstrip(), pytrace=False)
    # pass and xpass return: pytest's xfail marker turns the latter into XPASS (or a failure with --zc-strict).
