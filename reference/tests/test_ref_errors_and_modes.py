"""Bad input gets errors naming the problem; task mode and Ray Data's fn_constructor_kwargs work."""

from __future__ import annotations

import threading

import _refhelp as h
import pytest
import ray
import torch
from torch import nn

from zcbench.reference import (
    DeviceUnavailableError,
    ModelWrapper,
    NoModulesError,
    UnknownModeError,
    UnpicklableAttributeError,
    UnsupportedTensorError,
)
from zcbench.suites import models as cases
from zcbench.suites.equality import assert_same

h.register(__name__)


class Helper:
    def __init__(self):
        self.lock = threading.Lock()


class LockedPipeline:
    def __init__(self):
        self.model = nn.Linear(8, 8)
        self.helper = Helper()


class SparseModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.register_buffer("adjacency", torch.eye(8).to_sparse())


@pytest.mark.parametrize("obj", [{"a": 1}, [torch.randn(4)], torch.randn(4)], ids=["dict", "list", "tensor"])
def test_no_modules(obj):
    with pytest.raises(NoModulesError, match="no torch.nn.Module"):
        ModelWrapper.from_model(obj)


def test_unknown_mode():
    with pytest.raises(UnknownModeError, match="'batch'"):
        ModelWrapper.from_model(nn.Linear(2, 2), mode="batch")


def test_unpicklable_attribute_names_its_path():
    with pytest.raises(UnpicklableAttributeError, match=r"helper\.lock") as info:
        ModelWrapper.from_model(LockedPipeline())
    assert "lock" in str(info.value).lower()


def test_sparse_tensor_names_the_tensor():
    with pytest.raises(UnsupportedTensorError, match="adjacency") as info:
        ModelWrapper.from_model(SparseModel())
    assert "sparse" in str(info.value)


def test_missing_device_in_actor(ray_session):
    wrapper = ModelWrapper.from_model(cases.build_blob(8))
    [holder] = h.pool(1)
    with pytest.raises(DeviceUnavailableError, match="cuda:3"):
        ray.get(holder.load.remote([wrapper], device="cuda:3"))


class WithEncode(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = cases.build_blob(8)

    def forward(self, x):
        return self.body(x)

    def encode(self, x, scale=1.0):
        return self.body(x).sum(-1) * scale


def test_task_mode_runs_calls_as_tasks(ray_session):
    torch.manual_seed(0)
    model = WithEncode().eval()
    (x,) = cases.blob_case(8).inputs()
    wrapper = ModelWrapper.from_model(model, mode="task")
    remote = wrapper.load()
    with torch.no_grad(), h.like_actor():
        assert_same(remote(x), model(x))
        assert_same(remote.encode(x, scale=2.0), model.encode(x, scale=2.0))
    assert "encode" in dir(remote)
    with pytest.raises(AttributeError, match="no public method 'decode'"):
        remote.decode(x)


class InferenceActor:
    """The seed's Ray Data callable: loads the model once per actor."""

    def __init__(self, model_wrapper):
        self.model = model_wrapper.load()

    def __call__(self, batch):
        with torch.no_grad():
            out = self.model(torch.as_tensor(batch["x"]))
        # Which rows were batched together: BLAS results may depend on the batch's shape.
        batch_id = [int(batch["row"][0])] * len(batch["row"])
        return {"row": batch["row"], "batch": batch_id, "y": out.numpy()}


def test_wrapper_as_fn_constructor_kwargs(ray_session):
    from ray.data import ActorPoolStrategy

    model = cases.build_blob(8)
    xs = torch.randn(48, 1024, generator=torch.Generator().manual_seed(9))
    wrapper = ModelWrapper.from_model(model)
    ds = ray.data.from_items([{"row": i, "x": xs[i].numpy()} for i in range(len(xs))])
    rows = (
        ds.map_batches(
            InferenceActor,
            fn_constructor_kwargs={"model_wrapper": wrapper},
            compute=ActorPoolStrategy(size=1),
            num_cpus=0.1,
            batch_size=16,
        )
        .take_all()
    )
    assert sorted(r["row"] for r in rows) == list(range(len(xs)))
    batches: dict[int, list] = {}
    for r in rows:
        batches.setdefault(r["batch"], []).append(r)
    for group in batches.values():
        with torch.no_grad(), h.like_actor():
            expected = model(xs[[r["row"] for r in group]])
        for r, want in zip(group, expected):
            assert torch.equal(torch.as_tensor(r["y"]), want), f"row {r['row']} differs"
