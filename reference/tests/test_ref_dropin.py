"""Drop-in for ray_zerocopy's public ModelWrapper: the same calls work with only the import changed."""

from __future__ import annotations

import _refhelp as h
import pytest
import ray
import torch
from torch import nn

from zcbench.reference import ModelWrapper, TaskModel
from zcbench.suites import models as cases
from zcbench.suites.equality import assert_same

h.register(__name__)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)

    def forward(self, x):
        return torch.tanh(self.proj(x))

    def encode(self, x, scale=1.0):
        return self.forward(x) * scale

    def describe(self):
        return "encoder"


class Pipeline:
    """The seed guide's pipeline shape: models in top-level attributes, plus plain state."""

    def __init__(self):
        torch.manual_seed(5)
        self.encoder = Encoder()
        self.decoder = nn.Linear(32, 8)
        self.threshold = 0.5
        self.notes = ["not a module"]

    def __call__(self, x):
        return self.decoder(self.encoder(x))

    def score(self, x):
        return (self(x) > self.threshold).sum()


def _x():
    return torch.randn(3, 64, generator=torch.Generator().manual_seed(6))


def test_task_mode_exposes_submodules_of_a_pipeline(ray_session):
    pipe = Pipeline()
    x = _x()
    loaded = ModelWrapper.from_model(pipe, mode="task").load()
    with torch.no_grad(), h.like_actor():
        assert_same(loaded(x), pipe(x))
        assert_same(loaded.encoder(x), pipe.encoder(x))  # the submodule alone, in a task
        assert_same(loaded.encoder.encode(x, scale=2.0), pipe.encoder.encode(x, scale=2.0))
        assert_same(loaded.decoder(pipe.encoder(x)), pipe.decoder(pipe.encoder(x)))
        assert_same(loaded.score(x), pipe.score(x))  # the pipeline's own methods stay available
    assert {"encoder", "decoder", "score"} <= set(dir(loaded))
    assert isinstance(loaded.encoder, TaskModel)
    with pytest.raises(AttributeError, match="no public method 'threshold'"):
        loaded.threshold  # noqa: B018 - plain attributes are not readable from the stand-in (documented)


def test_method_names_restrict_what_modules_expose(ray_session):
    torch.manual_seed(0)
    model = Encoder()
    x = _x()
    # Positional, in ray_zerocopy's order: (model, mode, model_attr_names, method_names).
    loaded = ModelWrapper.from_model(model, "task", None, ("encode", "missing"))
    remote = loaded.load()
    with torch.no_grad(), h.like_actor():
        assert_same(remote.encode(x), model.encode(x))
        assert_same(remote(x), model(x))  # __call__ is always kept, as in ray_zerocopy
    assert set(loaded.info.methods) == {"__call__", "encode"}  # names the model lacks are dropped
    with pytest.raises(AttributeError, match="no public method 'describe'"):
        remote.describe()
    pipe = ModelWrapper.from_model(Pipeline(), mode="task", method_names=("encode",)).load()
    assert "encode" in dir(pipe.encoder) and "describe" not in dir(pipe.encoder)
    assert "score" in dir(pipe)  # method_names apply to the modules, not to the pipeline's own methods


def test_model_attr_names_choose_the_submodules(ray_session):
    pipe = Pipeline()
    loaded = ModelWrapper.from_model(pipe, mode="task", model_attr_names=["encoder"]).load()
    with torch.no_grad(), h.like_actor():
        assert_same(loaded.encoder(_x()), pipe.encoder(_x()))
    with pytest.raises(AttributeError, match="'decoder'"):
        loaded.decoder  # noqa: B018
    with pytest.raises(AttributeError, match="nowhere"):
        ModelWrapper.from_model(pipe, mode="task", model_attr_names=["nowhere"])
    with pytest.raises(TypeError, match="'notes' is a list, not a torch.nn.Module"):
        ModelWrapper.from_model(pipe, mode="task", model_attr_names=["notes"])


def test_for_tasks_shortcut(ray_session):
    torch.manual_seed(1)
    model = Encoder()
    remote = ModelWrapper.for_tasks(model, method_names=("encode",))
    with torch.no_grad(), h.like_actor():
        assert_same(remote.encode(_x()), model.encode(_x()))


def test_serialize_round_trip_and_fast_load_flag(ray_session):
    original = cases.build_blob(8)
    (x,) = cases.blob_case(8).inputs()
    wrapper = ModelWrapper.from_model(original)
    state = wrapper.serialize()
    assert isinstance(state["ref"], ray.ObjectRef) and state["mode"] == "actor"
    again = ModelWrapper.deserialize(**state)
    assert again.info == wrapper.info and again.ref == wrapper.ref
    assert len(ray.cloudpickle.dumps(state)) < 4096  # still small: a reference and a description
    with h.like_actor():
        expected = h.run(original, x)
    [holder] = h.spawn(again, _use_fast_load=True)  # ray_zerocopy's flag is accepted (and changes nothing)
    try:
        assert torch.equal(ray.get(holder.apply.remote(h.run, x)), expected)
        assert ray.get(holder.apply.remote(h.residency))["outside"] == []
    finally:
        h.kill([holder])
    with pytest.raises(TypeError, match="ray_zerocopy"):
        ModelWrapper.deserialize(skeleton=None, model_info={}, is_standalone_module=True, mode="actor")


def _seed_library_calls(wrapper_cls, pipe, x):
    """User code written for ray_zerocopy: the calls its documentation shows."""
    task = wrapper_cls.from_model(pipe, mode="task", model_attr_names=None, method_names=("__call__", "encode"))
    remote = task.load()
    actor = wrapper_cls.deserialize(**wrapper_cls.from_model(pipe, mode="actor").serialize())
    local = actor.load(_use_fast_load=False)
    with torch.no_grad():
        return {
            "pipeline": remote(x),
            "encoder": remote.encoder(x),
            "encode": remote.encoder.encode(x),
            "actor": local(x),
        }


@pytest.mark.parametrize("library", ["ray_zerocopy", "reference"])
def test_the_same_user_code_runs_on_both_libraries(ray_session, library):
    if library == "ray_zerocopy":
        rzc = pytest.importorskip("ray_zerocopy")
        wrapper_cls = rzc.ModelWrapper
    else:
        wrapper_cls = ModelWrapper
    pipe, x = Pipeline(), _x()
    with h.like_actor():
        got = _seed_library_calls(wrapper_cls, pipe, x)
        with torch.no_grad():
            expected = {"pipeline": pipe(x), "encoder": pipe.encoder(x), "encode": pipe.encoder.encode(x), "actor": pipe(x)}
    for key in expected:
        assert_same(got[key], expected[key])
