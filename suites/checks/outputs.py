"""Identical outputs: the loaded model computes bit-identical results to the original."""

from __future__ import annotations

import ray

from .. import actors
from ..cases import MIXED, ModelCase
from ..compare import assert_same
from ..contract import release
from ..registry import check


def _run_case(model, case: ModelCase, inputs):
    return case.run(model, inputs)


def outputs_match(impl, case: ModelCase, count: int = 1) -> None:
    """Load ``case`` in ``count`` actors and compare each one's outputs with the original's."""
    original = case.build()
    inputs = case.inputs()
    expected = case.run(original, inputs)
    wrapped = impl.wrap(original, "actor")
    pool = actors.spawn(impl, wrapped, count)
    try:
        for got in ray.get([a.apply.remote(_run_case, case, inputs) for a in pool]):
            assert_same(got, expected)
    finally:
        actors.kill(pool)
        release(impl, wrapped)


@check("outputs.mixed_model")
def check_outputs_mixed(impl) -> None:
    """Outputs of a model with bf16, tied, channels_last, non-contiguous weights equal the original's."""
    outputs_match(impl, MIXED, count=2)
