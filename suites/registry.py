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


@dataclass(frozen=True)
class Check:
    """One registered conformance check."""

    id: str
    fn: Callable[[Any], Any]
    requires: tuple[str, ...] = ()  # capability flags that must be true
    doc: str = ""
    slow: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def property(self) -> str:
        return self.id.split(".", 1)[0]

    def missing_capabilities(self, impl: Any) -> list[str]:
        caps = impl.capabilities
        return [flag for flag in self.requires if not getattr(caps, flag, False)]


_CHECKS: dict[str, Check] = {}


def check(check_id: str, *, requires: tuple[str, ...] = ("cpu",), slow: bool = False) -> Callable:
    """Register ``fn`` as the check ``check_id``."""

    def register(fn: Callable) -> Callable:
        if check_id in _CHECKS and _CHECKS[check_id].fn is not fn:
            raise ValueError(f"check id {check_id!r} registered twice")
        doc = (fn.__doc__ or "").strip().split("\n")[0]
        _CHECKS[check_id] = Check(check_id, fn, tuple(requires), doc, slow)
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
