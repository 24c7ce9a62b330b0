"""The catalogue of conformance checks.

Each check is a plain function ``fn(impl)`` registered with :func:`check`: it raises
``AssertionError`` (or any exception) to fail, :class:`SkipCheck` to skip, and returns
normally to pass. It may return a dict of observations (kept in the result record).
Check ids read ``<property>.<what>`` (``zero_copy.bytes_in_store``) so an expected
failure can name one check or a whole property by prefix.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: Check modules, one per property, imported to fill the registry.
PROPERTY_MODULES = (
    "outputs",
    "zero_copy",
    "fidelity",
    "isolation",
    "lifetime",
    "pipelines",
    "task_mode",
    "ray_data",
    "bad_input",
    "multi_node",
    "gpu",
    "scale",
)


class SkipCheck(Exception):
    """Raised by a check that does not apply (the message says why)."""


#: Seconds a check may run before the executor stops it and reports an error.
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Check:
    """One registered conformance check.

    ``requires``: capability flags the implementation must declare, else the check is skipped.
    ``needs``: hardware (``"cuda"``) this machine must have, else skipped with that reason.
    ``hosts``: probe actors it uses at once, per node role, so they are started ahead of it.
    ``timed``: it judges durations, so it runs only once no probe actor is starting.
    """

    id: str
    fn: Callable[[Any], Any]
    requires: tuple[str, ...] = ("cpu",)
    needs: tuple[str, ...] = ()
    hosts: dict[str, int] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    doc: str = ""
    timed: bool = False

    @property
    def property(self) -> str:
        return self.id.split(".", 1)[0]

    def missing_capabilities(self, impl: Any) -> list[str]:
        caps = impl.capabilities
        return [flag for flag in self.requires if not getattr(caps, flag, False)]

    def missing_hardware(self) -> str | None:
        """Why this machine cannot run the check (e.g. no CUDA device), or None."""
        if "cuda" in self.needs:
            import torch

            if not torch.cuda.is_available():
                return "no CUDA device on this machine"
        return None


_CHECKS: dict[str, Check] = {}


def check(
    check_id: str,
    *,
    requires: tuple[str, ...] = ("cpu",),
    needs: tuple[str, ...] = (),
    hosts: dict[str, int] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    timed: bool = False,
) -> Callable:
    """Register ``fn`` as the check ``check_id``."""

    def register(fn: Callable) -> Callable:
        if check_id in _CHECKS and _CHECKS[check_id].fn is not fn:
            raise ValueError(f"check id {check_id!r} registered twice")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _CHECKS[check_id] = Check(check_id, fn, tuple(requires), tuple(needs), dict(hosts) if hosts is not None else {"head": 2}, timeout_s, doc, timed)
        return fn

    return register


def all_checks() -> list[Check]:
    """Every check, in a stable order (property modules in catalogue order)."""
    for name in PROPERTY_MODULES:
        try:
            importlib.import_module(f"zcbench.suites.checks.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"zcbench.suites.checks.{name}":
                raise
    order = {name: i for i, name in enumerate(PROPERTY_MODULES)}
    return sorted(_CHECKS.values(), key=lambda c: (order.get(c.property, len(order)), c.id))
