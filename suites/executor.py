"""The one executor: run conformance checks against an implementation and give each a verdict.

The pytest plugin, :func:`run_checks` and ``zcbench conformance`` all come here. Each
check ends in one status:

``pass``   the property holds.
``fail``   the implementation broke the property (see :mod:`.verdicts`).
``error``  the check could not run (Ray did not start, a probe actor never came up, a wait of
           ours timed out, a probe crashed). It is retried once on a fresh cluster; if it
           persists it stays ``error``, never counted against the implementation.
``skip``   a capability the implementation does not declare, or hardware this machine lacks.
``xfail``  failed, as its authors' expected-failures file says it would.
``xpass``  passed although expected to fail (a ``fail`` with ``strict``).
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import fingerprint, verdicts, xfails
from .contract import Implementation, load_implementation
from .errors import InfrastructureError
from .registry import Check, SkipCheck, all_checks

STATUSES = ("pass", "fail", "error", "skip", "xfail", "xpass")
#: Bytes the object store may hold above a check's starting level once the check cleaned up.
SETTLE_SLACK = 64 * 1024
SETTLE_TIMEOUT_S = 3.0
#: Checks whose probe actors start in the background while an earlier one runs. Starting every
#: actor a run needs at once (16 for ``scale.pool_16_actors``) would hold up the first verdicts
#: for as long as all of them take to import torch on a small machine.
LOOKAHEAD = 3


class DriverEnvError(RuntimeError):
    """The implementation's environment cannot be applied: ray was imported without it."""


class StaleExpectedFailures(UserWarning):
    """Expected-failure entries that match no registered check."""


class CheckTimeout(InfrastructureError):
    """A check did not finish within its time limit (who hung is unknown: reported as an error)."""


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
    """What was tested with what: implementation, suite fingerprint, library versions, profile, xfails."""
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
        "suite_fingerprint": fingerprint.current(),
        "torch": _version("torch"),
        "ray": _version("ray"),
        "hypothesis": _version("hypothesis"),
        "python": platform.python_version(),
        "hypothesis_profile": os.environ.get("ZCBENCH_PROFILE") or "zcbench-ci",
        "expected_failures": xf,
    }


def skip_reason(check: Check, impl: Implementation) -> str | None:
    """Why ``check`` does not apply: a capability ``impl`` does not declare, or hardware absent here."""
    missing = check.missing_capabilities(impl)
    if missing:
        return f"capability {', '.join(missing)} not declared by {impl.name}"
    return check.missing_hardware()


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
    attempts: int = 0
    first_error: str | None = None  # the error of the first attempt, when it was retried

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def _time_limit(seconds: float | None):
    """Raise CheckTimeout in the main thread after ``seconds`` (no limit elsewhere or when None)."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise CheckTimeout(f"the check did not finish within {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Raised:
    """What an exception told about a check, kept after its frames are cleared."""

    text: str
    reason: str
    traceback: str

    @classmethod
    def of(cls, exc: BaseException) -> Raised:
        # The frames hold the check's locals (wrappers, ObjectRefs): cleared, the store
        # drains at once and the clean-up need not wait for it.
        raised = cls(verdicts.clean(str(exc)), verdicts.reason(exc), verdicts.full_traceback(exc))
        for e in (exc, exc.__cause__, exc.__context__):
            if e is not None:
                traceback.clear_frames(e.__traceback__)
        return raised


class Executor:
    """Runs checks in this process on one Ray session, retrying errors once on a fresh cluster."""

    def __init__(self, ray_address: str | None = None):
        self.ray_address = ray_address
        self.broken: str | None = None  # set once the cluster could not be restarted
        self.plan: list[Check] = []  # the checks prepare() was told will run, in order

    def session(self):
        # Imported here: ray must not be imported before the driver env is applied.
        from . import session

        return session.current(self.ray_address)

    def prepare(self, impl: Implementation, checks: list[Check]) -> None:
        """Start the cluster, and in the background the probe actors the first checks will need."""
        self.plan = [c for c in checks if skip_reason(c, impl) is None]
        if not self.plan:
            return  # every check is skipped: no cluster to start
        try:
            self.session().start()
        except InfrastructureError:
            return  # the first check reports it, as an error
        self._prestart(impl, self.plan[:LOOKAHEAD])

    def _prestart(self, impl: Implementation, checks: list[Check]) -> None:
        from . import hosts

        wanted: dict[str, int] = {}
        for c in checks:
            for role, n in c.hosts.items():
                wanted[role] = max(wanted.get(role, 0), n)
        try:
            hosts.prestart(impl, wanted)
        except InfrastructureError:
            pass  # the check that needs them reports it, as an error

    def _prestart_ahead(self, check: Check, impl: Implementation) -> None:
        """Top up the probe actors of the next few planned checks while this one runs.

        A timed check instead waits until every actor started in the background is up, so no
        process start competes with what it times.
        """
        from . import hosts

        if self.broken or not self.session().started:
            return  # the check's own attempt starts the cluster, and reports it if it cannot
        if check.timed:
            hosts.wait_for_starts()
        elif check in self.plan:
            # Its own actors first, and up: the ones for later checks would only slow their start.
            self._prestart(impl, [check])
            hosts.wait_for_starts()
            at = self.plan.index(check)
            window = self.plan[at : at + LOOKAHEAD]
            # Nothing for the checks after a timed one: it would wait for them to start.
            ahead = next((i for i, c in enumerate(window) if c.timed), len(window))
            self._prestart(impl, window[: ahead + 1])

    def _attempt(self, check: Check, impl: Implementation) -> tuple[str, Any]:
        """One run of ``check``: (``"pass"``, observations) or (``"skip"``/``"fail"``/``"error"``, :class:`Raised`)."""
        from . import hosts, probes  # after the driver env is applied

        session = self.session()
        start_bytes = None
        try:
            with _time_limit(check.timeout_s):
                session.start()
                hosts.forget_touched()
                start_bytes = probes.store_bytes()
                observations = check.fn(impl)
            return "pass", observations
        except SkipCheck as exc:
            return "skip", Raised.of(exc)
        except Exception as exc:  # noqa: BLE001 - every exception is a verdict or an error
            return verdicts.classify(exc), Raised.of(exc)
        finally:
            try:
                self._clean_up(start_bytes)
            except Exception:  # noqa: BLE001 - a broken cluster is found by the next check's start
                pass
            # What outlived a check and its clean-up (modules, caches, the session) is long-lived:
            # the collector stops scanning it, so the collections that let a check's ObjectRefs go
            # cost what the check allocated, not the driver's whole heap (torch, transformers, Ray
            # Data: about 0.25 s each, half the driver's CPU). Undone by :func:`thaw`.
            gc.freeze()

    @staticmethod
    def _clean_up(start_bytes: int | None) -> None:
        """Give every host back and wait until the store is back where the check found it.

        The next check's store readings need no quiet period then. If the bytes do not
        come back, the hosts the check used may hold what it leaked: they are killed.
        """
        from . import hosts, probes

        hosts.reclaim_all()
        if start_bytes is None:
            return
        gc.collect()

        def settled(value: int) -> bool:
            return value <= start_bytes + SETTLE_SLACK

        if not settled(probes.wait_store_bytes(settled, SETTLE_TIMEOUT_S)):
            hosts.kill_touched()
            probes.wait_store_bytes(settled, SETTLE_TIMEOUT_S)

    def execute(
        self, check: Check, impl: Implementation, *, expected_reason: str | None = None, strict: bool = False
    ) -> CheckResult:
        """Run one check and give it its status (an error is retried once on a fresh cluster)."""
        result = CheckResult(check.id, check.property, "skip", expected_failure=expected_reason)
        skip = skip_reason(check, impl)
        if skip:
            result.reason = skip
            return result
        started = time.perf_counter()
        try:
            self._prestart_ahead(check, impl)
        except Exception:  # noqa: BLE001 - a broken cluster is the check's own attempt to report, as an error
            pass
        if self.broken:
            kind, outcome = "error", Raised.of(InfrastructureError(self.broken))
        else:
            kind, outcome = self._attempt(check, impl)
            result.attempts = 1
            if kind == "error":
                result.first_error = outcome.reason
                try:
                    self.session().restart()
                except InfrastructureError as exc:
                    self.broken = f"Ray could not be restarted after an error: {verdicts.reason(exc)}"
                else:
                    kind, outcome = self._attempt(check, impl)
                    result.attempts = 2
        result.duration_s = time.perf_counter() - started
        _settle(result, kind, outcome, expected_reason, strict)
        return result


def thaw() -> None:
    """Give the objects the executor froze back to the cyclic collector (the end of a run)."""
    gc.unfreeze()


def _settle(result: CheckResult, kind: str, outcome: Any, expected_reason: str | None, strict: bool) -> None:
    if kind == "pass":
        if isinstance(outcome, dict):
            result.observations = outcome
        if expected_reason is None:
            result.status = "pass"
        elif strict:
            result.status, result.reason = "fail", f"expected to fail ({expected_reason}) but passed [strict]"
        else:
            result.status, result.reason = "xpass", f"expected to fail ({expected_reason}) but passed"
        return
    if kind == "skip":
        reason = outcome.text or "skipped by the check"
        result.status, result.reason = "skip", reason[: verdicts.REASON_LIMIT]
        return
    result.reason = outcome.reason
    result.traceback = outcome.traceback
    if kind == "error":
        result.status = "error"
    else:
        result.status = "xfail" if expected_reason else "fail"


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
    progress: Callable[[int, int, CheckResult], None] | None = None,
    hold_timed: Callable[[], None] | None = None,
) -> list[CheckResult]:
    """Run the selected checks against ``impl`` in this process, one Ray cluster for all; one record per check.

    With ``hold_timed``, the checks that judge durations run last, once it returns: a caller
    whose other runs share the machine waits there until they are quiet.
    """
    obj = resolve(impl)
    expected = xfails.coerce(expected_failures)
    checks = select_checks(select)
    if hold_timed is not None:
        checks = [c for c in checks if not c.timed] + [c for c in checks if c.timed]
    stale = xfails.unmatched(expected, [c.id for c in all_checks()])
    if stale:
        warnings.warn(f"expected failures match no check: {', '.join(stale)}", StaleExpectedFailures, stacklevel=2)
    executor = Executor(ray_address)
    executor.prepare(obj, checks)
    results = []
    try:
        for i, c in enumerate(checks, start=1):
            if hold_timed is not None and c.timed:
                hold_timed, hold = None, hold_timed
                hold()
            results.append(executor.execute(c, obj, expected_reason=xfails.reason_for(c.id, expected), strict=strict))
            if progress is not None:
                progress(i, len(checks), results[-1])
    finally:
        thaw()
    return results
