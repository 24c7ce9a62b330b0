"""Identical outputs for every dtype, and no copies: bytes in the store, flat USS per extra actor."""

from __future__ import annotations

import _refhelp as h
import pytest
import ray
import torch

from zcbench.reference import ModelWrapper
from zcbench.suites import models as cases
from zcbench.suites.equality import assert_same

h.register(__name__)


@pytest.mark.parametrize(
    "build, inputs",
    [
        (h.build_dtypes, lambda: (torch.randn(4, 512, generator=torch.Generator().manual_seed(5)),)),
        (cases.build_mixed, cases.mixed_inputs),
    ],
    ids=["f32-bf16-f16", "mixed"],
)
def test_outputs_identical_in_actor(ray_session, build, inputs):
    original = build()
    args = inputs()
    with h.like_actor():
        expected = h.run(original, *args)
    holders = h.spawn(ModelWrapper.from_model(original), 2)
    try:
        for got in ray.get([a.apply.remote(h.run, *args) for a in holders]):
            assert_same(got, expected)
    finally:
        h.kill(holders)


def test_every_parameter_and_buffer_lies_in_the_store(ray_session):
    model = cases.build_mixed()
    [holder] = h.spawn(ModelWrapper.from_model(model))
    try:
        where = ray.get(holder.apply.remote(h.residency))
    finally:
        h.kill([holder])
    # Every tensor of Mixed is a parameter or buffer; tied ones are listed twice.
    assert where["tensors"] == sum(1 for _ in cases.build_mixed().named_parameters(remove_duplicate=False)) + sum(
        1 for _ in model.named_buffers(remove_duplicate=False)
    )
    assert where["outside"] == [], f"tensors outside the object store: {where['outside']}"
    assert where["bytes_in_store"] == where["bytes_total"] > 4 * h.MiB


def test_second_actor_adds_little_uss_whatever_the_size(ray_session):
    """Load 64 and 128 MiB models in two actors each; the second one's USS growth stays flat."""
    growth = {}
    for mib in (64, 128):
        wrapper = ModelWrapper.from_model(cases.build_blob(mib))
        holders, (_, second) = h.spawn_reports(wrapper, 2)
        try:
            ours = ray.get(holders[1].apply.remote(h.residency))
        finally:
            h.kill(holders)
        assert ours["bytes_in_store"] >= mib * h.MiB * 0.99
        growth[mib] = (second["after"]["uss"] - second["before"]["uss"]) / h.MiB
        # The pages are shared: this actor's proportional share of the store is at most half.
        assert second["after"]["store_pss"] <= 0.6 * mib * h.MiB, second
    assert max(growth.values()) < 8, f"USS growth per second actor (MiB): {growth}"
    assert abs(growth[128] - growth[64]) < 4, f"USS growth scales with the model: {growth}"
