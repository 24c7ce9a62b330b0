"""The lifetime, pipelines, task-mode and bad-input checks pass on the reference and catch broken implementations.

The broken implementations below are reference adapters with one defect each; workers
rebuild them from their ``module:factory`` spec, so this module must stay importable as
``zcbench.suites.tests.test_checks_misc``.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from zcbench.suites.checks import bad_input, lifetime, pipelines, task_mode
from zcbench.suites.contract import load_implementation
from zcbench.suites.implementations.reference import ReferenceImpl

HERE = "zcbench.suites.tests.test_checks_misc"

#: Wrapped objects the leaky implementation never lets go of.
_LEAKED: list[Any] = []


class LeakyImpl(ReferenceImpl):
    """Keeps every wrapped object in a global list: the store never gets its bytes back."""

    name = "broken-leaky"

    def wrap(self, obj: Any, mode: str = "actor") -> Any:
        wrapped = super().wrap(obj, mode)
        _LEAKED.append(wrapped)
        return wrapped


class SwallowingImpl(ReferenceImpl):
    """Swallows every error of wrap and returns None instead."""

    name = "broken-swallowing"

    def wrap(self, obj: Any, mode: str = "actor") -> Any:
        try:
            return super().wrap(obj, mode)
        except Exception:  # noqa: BLE001 - the defect under test
            return None


class DeepcopyImpl(ReferenceImpl):
    """Rebuilds the modules in a pipeline's dict attributes as separate deep copies on load."""

    name = "broken-deepcopy"

    def load(self, wrapped: Any, device: str = "cpu") -> Any:
        obj = super().load(wrapped, device)
        if not isinstance(obj, torch.nn.Module):
            for name, value in vars(obj).items():
                if isinstance(value, dict):
                    setattr(obj, name, {k: copy.deepcopy(v) for k, v in value.items()})
        return obj


class DriverTaskImpl(ReferenceImpl):
    """Task mode that loads the model in the driver instead of running calls as tasks."""

    name = "broken-driver-task"

    def load(self, wrapped: Any, device: str = "cpu") -> Any:
        if wrapped.info.mode == "task":
            return wrapped.as_actor_mode().load(device)
        return super().load(wrapped, device)


@pytest.fixture(scope="module")
def reference(ray_session):
    return load_implementation("reference")


def _broken(name: str, ray_session) -> Any:
    return load_implementation(f"{HERE}:{name}")


REFERENCE_CHECKS = [
    lifetime.check_driver_drops_wrapper,
    lifetime.check_store_pressure,
    lifetime.check_release_after_use,
    lifetime.check_repeated_cycles,
    pipelines.check_containers,
    pipelines.check_methods,
    task_mode.check_outputs,
    task_mode.check_zero_copy,
    bad_input.check_no_modules,
    bad_input.check_unknown_mode,
    bad_input.check_unpicklable_attribute,
    bad_input.check_unsupported_tensor,
    bad_input.check_missing_device,
]


@pytest.mark.parametrize("fn", REFERENCE_CHECKS, ids=lambda fn: fn.__name__.removeprefix("check_"))
def test_reference_passes(reference, fn):
    fn(reference)


def test_leak_fails_release_after_use(ray_session):
    impl = _broken("LeakyImpl", ray_session)
    try:
        with pytest.raises(AssertionError, match="were not freed"):
            lifetime.check_release_after_use(impl)
    finally:
        # The leaky module copy is the one load_implementation imported, not this one.
        import sys

        sys.modules[HERE]._LEAKED.clear()


def test_swallowing_fails_bad_input(ray_session):
    impl = _broken("SwallowingImpl", ray_session)
    with pytest.raises(AssertionError, match="does not name 'bogus'"):
        bad_input.check_unknown_mode(impl)


def test_deepcopy_fails_containers(ray_session):
    impl = _broken("DeepcopyImpl", ray_session)
    with pytest.raises(AssertionError, match="two objects after load"):
        pipelines.check_containers(impl)


def test_driver_task_fails_zero_copy(ray_session):
    impl = _broken("DriverTaskImpl", ray_session)
    with pytest.raises(AssertionError, match="ran in the driver process"):
        task_mode.check_zero_copy(impl)
