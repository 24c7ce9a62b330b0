"""Write isolation: in-place writes in one actor never reach another actor, the store or the driver."""

from __future__ import annotations

import _refhelp as h
import pytest
import ray
import torch

from zcbench.reference import IsolationUnavailableError, ModelWrapper
from zcbench.suites import models as cases

h.register(__name__)

MIB = 16


def _add(model):
    with torch.no_grad():
        model.layers[0].weight.add_(1.0)


def _copy(model):
    with torch.no_grad():
        model.layers[1].bias.copy_(torch.full_like(model.layers[1].bias, 7.0))


def _load_state_dict(model):
    model.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})


def _through_data(model):
    model.layers[2].weight.data[:] = -3.0  # no autograd check on this path at all


WRITES = {"add_": _add, "copy_": _copy, "load_state_dict": _load_state_dict, ".data": _through_data}


@pytest.mark.parametrize("write", list(WRITES), ids=list(WRITES))
def test_write_in_one_actor_stays_there(ray_session, write):
    original = cases.build_blob(MIB)
    pristine = h.weight_digest(original)
    wrapper = ModelWrapper.from_model(original)
    writer, reader = h.spawn(wrapper, 2)
    try:
        ray.get(writer.apply.remote(WRITES[write]))
        assert ray.get(writer.apply.remote(h.weight_digest)) != pristine, "the write did not happen"
        assert ray.get(reader.apply.remote(h.weight_digest)) == pristine, "the write reached another actor"
        # A load after the write, and the driver's own view of the store, still see the original bytes.
        ray.get(reader.load.remote([wrapper]))
        assert ray.get(reader.apply.remote(h.weight_digest)) == pristine
        assert h.weight_digest(wrapper.load()) == pristine
        assert h.weight_digest(original) == pristine, "the write reached the driver's model"
    finally:
        h.kill([writer, reader])


def test_without_cow_auto_copies_and_cow_refuses(ray_session):
    original = cases.build_blob(MIB)
    pristine = h.weight_digest(original)
    wrapper = ModelWrapper.from_model(original)
    env = {"ZCBENCH_DISABLE_COW": "1"}
    holders, reports = h.spawn_reports(wrapper, 1, env=env, isolation="auto")
    [fallback] = holders
    try:
        assert any("RuntimeWarning" in w and "private copy" in w for w in reports[0]["warnings"]), reports[0]
        where = ray.get(fallback.apply.remote(h.residency))
        assert where["bytes_in_store"] == 0, "isolation='auto' without COW must load a private copy"
        ray.get(fallback.apply.remote(_add))
        [reader] = h.spawn(wrapper)
        assert ray.get(reader.apply.remote(h.weight_digest)) == pristine
        h.kill([reader])
        with pytest.raises(IsolationUnavailableError, match="copy-on-write"):
            ray.get(fallback.load.remote([wrapper], isolation="cow"))
    finally:
        h.kill(holders)
