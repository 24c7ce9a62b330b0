"""Run conformance checks without pytest: one record per check, ready for JSON.

The pytest plugin and the harness's conformance matrix share what is here: how an
implementation is resolved and its driver environment applied, the run header, and
the capability rule (a check needing a capability the implementation does not
declare is skipped, not failed).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import xfails
from .contract import Implementation, load_implementation
from .registry import Check, SkipCheck, all_checks

STATUSES = ("passed", "failed", "skipped", "xfailed", "xpassed")


class DriverEnvError(RuntimeError):
    """The implementation's environment cannot be applied: ray was imported without it."""


class StaleExpectedFailures(UserWarning):
    """Expected-failure entries that match no registered check."""


def apply_driver_env(impl: Implementation) -> dict[str, str]:
    """Put ``capabilities.worker_env`` into this process's environment; return what was set.

    Ray reads some variables (``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS``) only when it is
    imported, so a value that arrives after ``import ray`` would silently not apply.
    """
    env = dict(impl.capabilities.worker_env)
    differing = {k: v for k, v in env.items() if os.environ.get(k) != v}
    if differing and "ray" in sys.modules:
        exports = " ".join(f"{k}={v}" for k, v in differing.items())
        raise DriverEnvError(
            f"implementation {impl.name!r} needs {exports} in the driver's environment before ray is "
            f"imported, but ray is already imported without it. Export it before starting "
            f"(`{exports} pytest --zc-impl {impl.name} ...`), or run the conformance matrix "
            f"(`zcbench conformance --impl {impl.name}`), which starts each implementation in its "
            f"own subprocess with its environment."
        )
    os.environ.update(differing)
    return differing


def resolve(impl: str | Implementation) -> Implementation:
    """Load an implementation named by a string (applying its driver env), or check an object."""
    if isinstance(impl, str):
        obj = load_implementation(impl)
        apply_driver_env(obj)
        return obj
    if not getattr(impl, "spec", None):
        raise ValueError(
            f"implementation object {impl!r} has no 'spec': Ray workers rebuild the implementation "
            "from it; pass its name or 'package.module:factory' instead"
        )
    apply_driver_env(impl)
    return impl


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def header(impl: Implementation, *, expected_failures: str | Path | Mapping[str, str] | None = None) -> dict[str, Any]:
    """What was tested with what: implementation, suite and library versions, profile, xfails."""
    if isinstance(expected_failures, (str, Path)):
        xf: str | None = str(expected_failures)
    elif expected_failures:
        xf = f"<{len(expected_failures)} entries given inline>"
    else:
        xf = None
    return {
        "implementation": impl.name,
        "spec": getattr(impl, "spec", None),
        "version": str(impl.version),
        "capabilities": impl.capabilities.as_dict(),
        "suite_version": _version("zcbench"),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "hypothesis": _version("hypothesis"),
        "python": platform.python_version(),
        "hypothesis_profile": os.environ.get("ZCBENCH_PROFILE", "default"),
        "expected_failures": xf,
    }


def capability_skip_reason(check: Check, impl: Implementation) -> str | None:
    """Why ``check`` does not apply to ``impl`` (an undeclared capability), or None."""
    missing = check.missing_capabilities(impl)
    if not missing:
        return None
    return f"capability {', '.join(missing)} not declared by {impl.name}"


def one_line(text: str, limit: int = 200) -> str:
    """The first non-empty line of ``text``, shortened to ``limit`` characters."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass
class CheckResult:
    """The outcome of one check against one implementation."""

    check_id: str
    property: str
    status: str  # one of STATUSES
    reason: str = ""
    duration_s: float = 0.0
    observations: dict[str, Any] = field(default_factory=dict)
    traceback: str | None = None
    expected_failure: str | None = None  # the xfails reason, when one applies

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _failure_reason(exc: BaseException) -> str:
    msg = one_line(str(exc))
    if isinstance(exc, AssertionError):
        return msg or "assertion failed"
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def execute(
    check: Check,
    impl: Implementation,
    *,
    expected_reason: str | None = None,
    strict: bool = False,
    before: Callable[[], None] | None = None,
) -> CheckResult:
    """Run one check and classify it; ``before`` runs first (e.g. starting Ray) and counts as the check."""
    result = CheckResult(check.id, check.property, "skipped", expected_failure=expected_reason)
    skip = capability_skip_reason(check, impl)
    if skip:
        result.reason = skip
        return result
    start = time.perf_counter()
    try:
        if before is not None:
            before()
        observations = check.fn(impl)
    except SkipCheck as exc:
        result.reason = one_line(str(exc)) or "skipped by the check"
    except Exception as exc:
        result.status = "xfailed" if expected_reason else "failed"
        result.reason = _failure_reason(exc)
        result.traceback = traceback.format_exc()
    else:
        if isinstance(observations, dict):
            result.observations = observations
        if expected_reason is None:
            result.status = "passed"
        elif strict:
            result.status = "failed"
            result.reason = f"expected to fail ({expected_reason}) but passed [strict]"
        else:
            result.status = "xpassed"
            result.reason = f"expected to fail ({expected_reason}) but passed"
    result.duration_s = time.perf_counter() - start
    return result


def select_checks(select: list[str] | None) -> list[Check]:
    """Registered checks whose id equals or starts with one of ``select`` (all when None)."""
    checks = all_checks()
    if select is None:
        return checks
    chosen = set(xfails.select([c.id for c in checks], select))
    if not chosen:
        props = sorted({c.property for c in checks})
        raise ValueError(f"select {select!r} matches no check; properties: {', '.join(props)}")
    return [c for c in checks if c.id in chosen]


def run_checks(
    impl: str | Implementation,
    *,
    select: list[str] | None = None,
    expected_failures: str | Path | dict[str, str] | None = None,
    strict: bool = False,
    ray_address: str | None = None,
) -> list[CheckResult]:
    """Run the selected checks against ``impl`` in this process, one Ray cluster for all."""
    obj = resolve(impl)
    expected = xfails.coerce(expected_failures)
    checks = select_checks(select)
    stale = xfails.unmatched(expected, [c.id for c in all_checks()])
    if stale:
        warnings.warn(f"expected failures match no check: {', '.join(stale)}", StaleExpectedFailures, stacklevel=2)

    def start_ray() -> None:
        # Imported here: ray must not be imported before the driver env is applied.
        from .cluster import ensure_ray

        ensure_ray(ray_address)

    return [
        execute(c, obj, expected_reason=xfails.reason_for(c.id, expected), strict=strict, before=start_ray)
        for c in checks
    ]
