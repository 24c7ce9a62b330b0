"""The shipped adapters: contract, real loading, and the defects their docstrings declare.

Every physical claim is checked inside real Ray actors (weights > 100 KiB), against
what the probes read from /proc, never against what an implementation says.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

import pytest
import ray
import torch
from ray import cloudpickle

from zcbench.suites import hosts, probes
from zcbench.suites.contract import REGISTRY, Capabilities, Implementation, load_implementation, release
from zcbench.suites.controls import MUTANTS
from zcbench.suites.equality import assert_same
from zcbench.suites.implementations.ray_builtin import ENV_VAR, driver_enabled
from zcbench.suites.models import MIXED, blob_case

# The helpers below run inside actors, which cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

KiB = 1024
ADAPTERS = ["naive", "ray-builtin", "ray-zerocopy", "torch-mmap"]


# ---- helpers run inside actors -------------------------------------------------


def _layout(model) -> dict:
    """What a fidelity check would look at, read in the actor."""
    return {
        "tied_same_object": model.head.weight is model.embed.weight,
        "tied_same_bytes": model.head.weight.data_ptr() == model.embed.weight.data_ptr(),
        "block_dtype": str(model.block.weight.dtype),
        "conv_channels_last": model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        and not model.conv.weight.is_contiguous(),
        "proj_t_stride": tuple(model.proj_t.stride()),
        "buffers": sorted(n for n, _ in model.named_buffers()),
    }


def _write_first_weight(model) -> float:
    # inference_mode: ray-zerocopy loads inference tensors, which refuse writes outside it.
    with torch.inference_mode():
        w = next(model.parameters())
        w[(0,) * w.dim()] = 1234.5  # indexing, not view(-1): some weights are non-contiguous
        return float(w[(0,) * w.dim()])


def _first_weight(model) -> float:
    w = next(model.parameters())
    return float(w[(0,) * w.dim()])


def _run_mixed(model, inputs):
    return MIXED.run(model, inputs)


def _assert_mixed_outputs(actor) -> None:
    """The actor's loaded MIXED model computes bit-identical outputs to a fresh original."""
    inputs = MIXED.inputs()
    expected = MIXED.run(MIXED.build(), inputs)
    assert_same(ray.get(actor.apply(_run_mixed, inputs)), expected)


def _file_backed(model, path: str) -> dict:
    """Bytes of the model's tensors lying in a mapping of ``path`` vs. total."""
    backing = probes.backing_files(model)
    return {"inside": sum(v for k, v in backing.items() if path in k), "total": sum(backing.values())}


@ray.remote(num_cpus=0.01, runtime_env={"env_vars": {ENV_VAR: "1"}})
class _BuiltinDriver:
    """A process that imported ray with the variable set, standing in for the runner's subprocess."""

    def wrap(self, build):
        impl = load_implementation("ray-builtin")
        return [impl.wrap(build(), "actor")]  # boxed: the caller gets the ref, not the model


@pytest.fixture
def pool():
    """Collects loaded models whose hosts are given back after the test."""
    started: list = []
    yield started
    hosts.release(started)


def _spawn(pool, impl, wrapped, count=1):
    got = hosts.load(impl, wrapped, count)
    pool.extend(got)
    return got


ORIGINAL_BUFFERS = sorted(n for n, _ in MIXED.build().named_buffers())


# ---- contract ------------------------------------------------------------------


@pytest.mark.parametrize("spec", [REGISTRY[n] for n in ADAPTERS] + list(MUTANTS.values()))
def test_follows_contract(spec):
    impl = load_implementation(spec)
    assert isinstance(impl, Implementation)
    assert isinstance(impl.capabilities, Capabilities) and impl.capabilities.cpu
    assert isinstance(impl.version, str) and impl.version
    assert impl.spec == spec


def test_adapter_names_and_versions_are_honest():
    impls = {n: load_implementation(n) for n in ADAPTERS}
    assert {n: i.name for n, i in impls.items()} == {n: n for n in ADAPTERS}
    assert impls["ray-zerocopy"].version == importlib.metadata.version("ray-zerocopy")
    assert impls["naive"].version == impls["ray-builtin"].version == ray.__version__
    assert impls["torch-mmap"].version == torch.__version__
    assert impls["naive"].capabilities.zero_copy  # declared so the zero-copy checks run and fail it
    assert not impls["torch-mmap"].capabilities.multi_node
    assert impls["ray-builtin"].capabilities.worker_env == {ENV_VAR: "1"}
    assert [n for n, i in impls.items() if i.capabilities.task_mode] == ["ray-zerocopy"]


# ---- adapters on the MIXED model in real actors ---------------------------------


def test_naive_loads_exact_private_copies(ray_session, pool):
    impl = load_implementation("naive")
    wrapped = impl.wrap(MIXED.build())
    (a,) = _spawn(pool, impl, wrapped)
    _assert_mixed_outputs(a)
    res = ray.get(a.residency(100 * KiB))
    assert res["bytes_total"] > 4 * 2**20 and res["bytes_in_store"] == 0
    assert ray.get(a.apply(_layout)) == {
        "tied_same_object": True,
        "tied_same_bytes": True,
        "block_dtype": "torch.bfloat16",
        "conv_channels_last": True,
        "proj_t_stride": (1, 256),
        "buffers": ORIGINAL_BUFFERS,
    }


def test_torch_mmap_maps_the_checkpoint_and_keeps_fidelity(ray_session, pool):
    impl = load_implementation("torch-mmap")
    wrapped = impl.wrap(MIXED.build())
    try:
        (a,) = _spawn(pool, impl, wrapped)
        _assert_mixed_outputs(a)
        layout = ray.get(a.apply(_layout))
        assert layout["tied_same_object"] and layout["conv_channels_last"] and layout["proj_t_stride"] == (1, 256)
        assert layout["block_dtype"] == "torch.bfloat16" and layout["buffers"] == ORIGINAL_BUFFERS
        # Every byte is a page of the checkpoint file, none is in the object store.
        backed = ray.get(a.apply(_file_backed, wrapped.path))
        assert backed["inside"] == backed["total"] > 4 * 2**20
        assert ray.get(a.residency(100 * KiB))["bytes_in_store"] == 0
        # MAP_PRIVATE: a write stays with the writer.
        (b,) = _spawn(pool, impl, wrapped)
        before = ray.get(b.apply(_first_weight))
        assert ray.get(a.apply(_write_first_weight)) == 1234.5
        assert ray.get(b.apply(_first_weight)) == before != 1234.5
    finally:
        release(impl, wrapped)
    assert not os.path.exists(wrapped.path)


def test_ray_zerocopy_cannot_wrap_bf16(ray_session):
    """Known defect: it converts each tensor with ``.numpy()``, which has no bfloat16."""
    impl = load_implementation("ray-zerocopy")
    with pytest.raises(TypeError, match="BFloat16"):
        impl.wrap(MIXED.build(), "actor")


def _float_mixed():
    """MIXED with its bf16 block upcast, so ray-zerocopy can wrap it (its forward no longer runs)."""
    model = MIXED.build()
    model.block.float()
    return model


def test_ray_zerocopy_unties_weights_and_shares_writes(ray_session, pool):
    """Without bf16 it loads zero-copy, but ties become copies and writes reach every actor."""
    impl = load_implementation("ray-zerocopy")
    wrapped = impl.wrap(_float_mixed(), "actor")
    a, b = _spawn(pool, impl, wrapped, 2)
    layout = ray.get(a.apply(_layout))
    assert not layout["tied_same_object"] and not layout["tied_same_bytes"]
    assert layout["buffers"] == ORIGINAL_BUFFERS
    res = ray.get(a.residency(100 * KiB))
    assert res["outside"] == [], res  # zero-copy holds for what it stores
    ray.get(a.apply(_write_first_weight))
    assert ray.get(b.apply(_first_weight)) == 1234.5  # write_policy "shared", as declared


def test_ray_zerocopy_task_mode_runs_remotely(ray_session):
    impl = load_implementation("ray-zerocopy")
    case = blob_case(8)
    original = case.build()
    shim = impl.load(impl.wrap(original, "task"))
    assert not isinstance(shim, torch.nn.Module)  # calls go to Ray tasks
    assert_same(shim(*case.inputs()), case.run(original))


def test_ray_builtin_needs_the_variable_in_the_driver(ray_session):
    if driver_enabled():
        pytest.skip(f"this test process was started with {ENV_VAR}=1")
    with pytest.raises(RuntimeError, match=ENV_VAR):
        load_implementation("ray-builtin").wrap(MIXED.build())


def test_ray_builtin_is_zero_copy_but_loses_layout_and_shares_writes(ray_session, pool):
    impl = load_implementation("ray-builtin")
    driver = _BuiltinDriver.remote()  # owns the stored object: killed last
    try:
        (wrapped,) = ray.get(driver.wrap.remote(MIXED.build))
        a, b = _spawn(pool, impl, wrapped, 2)
        _assert_mixed_outputs(a)
        res = ray.get(a.residency(100 * KiB))
        assert res["outside"] == [] and res["bytes_in_store"] > 4 * 2**20, res
        layout = ray.get(a.apply(_layout))
        assert layout["tied_same_object"] and layout["block_dtype"] == "torch.bfloat16"
        assert layout["buffers"] == ORIGINAL_BUFFERS
        # Known defects: strided layouts are made contiguous before the put.
        assert not layout["conv_channels_last"] and layout["proj_t_stride"] == (256, 1)
        ray.get(a.apply(_write_first_weight))
        assert ray.get(b.apply(_first_weight)) == 1234.5
    finally:
        hosts.release(pool)
        pool.clear()
        ray.kill(driver)


