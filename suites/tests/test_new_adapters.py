"""The safetensors, tensorizer and torch-shm adapters: real loads in Ray actors, and the properties each declares.

Where the bytes lie is read from the actor's ``/proc/self/maps``, private memory from
its USS, never from what the adapter says.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import sys
import threading

import pytest
import ray
import torch
from ray import cloudpickle

from zcbench.suites import probes
from zcbench.suites.models import MIXED, blob_case
from zcbench.suites.contract import REGISTRY, Implementation, load_implementation, release

# The helpers below run inside actors, which cannot import this test module by name.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

MiB = 2**20
NEW = {"safetensors": "cow", "tensorizer": "copy", "torch-shm": "shared"}  # name -> declared write policy


@ray.remote(num_cpus=0.01)
class _Loader:
    """A worker process that loads through the adapter and records its USS around the load."""

    def __init__(self, name: str, box: list):
        self.impl = load_implementation(name)
        before = probes.memory().uss
        self.model = self.impl.load(box[0], "cpu")
        self.load_uss = probes.memory().uss - before

    def apply(self, fn, *args):
        return fn(self.model, *args)

    def load_uss_growth(self) -> int:
        return self.load_uss

    def drop(self) -> None:
        self.model = None
        gc.collect()


# ---- helpers run inside actors -------------------------------------------------


def _backing(model) -> dict[str, int]:
    """Bytes of the model's distinct storages by the mapping they lie in: 'perms name' (anonymous: '[anon]')."""
    maps = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            name = os.path.basename(parts[5]) if len(parts) > 5 and parts[5].startswith("/") else "[anon]"
            maps.append((lo, hi, f"{parts[1]} {'torch_*' if name.startswith('torch_') else name}"))
    found: dict[str, int] = {}
    seen = set()
    for _, t in probes.named_tensors(model):
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        kind = next((k for lo, hi, k in maps if lo <= s.data_ptr() < hi), "unmapped")
        found[kind] = found.get(kind, 0) + s.nbytes()
    return found


def _layout(model) -> dict:
    buffers = dict(model.named_buffers())
    return {
        "tied_same_object": model.head.weight is model.embed.weight,
        "block_dtype": str(model.block.weight.dtype),
        "conv_channels_last": model.conv.weight.is_contiguous(memory_format=torch.channels_last)
        and not model.conv.weight.is_contiguous(),
        "proj_t_stride": tuple(model.proj_t.stride()),
        "non_persistent": sorted(model._non_persistent_buffers_set),
        "buffers_are_parameters": sorted(n for n, b in buffers.items() if isinstance(b, torch.nn.Parameter)),
    }


def _outputs(model, inputs):
    return MIXED.run(model, inputs)


def _forward_uss(model, inputs) -> int:
    """USS growth of one forward pass, after a warm-up that pays torch's one-time allocations."""
    with torch.no_grad():
        torch.nn.Linear(inputs[0].shape[-1], 8)(inputs[0])
        before = probes.memory().uss
        model(*inputs)
        return probes.memory().uss - before


def _write_first_weight(model) -> float:
    with torch.no_grad():
        w = model.embed.weight
        w[0, 0] = 1234.5
        return float(w[0, 0])


def _first_weight(model) -> float:
    return float(model.embed.weight.detach()[0, 0])


def _first_param(model) -> float:
    return float(next(model.parameters()).detach().view(-1)[0])


# ---- fixtures and driver-side helpers --------------------------------------------


@pytest.fixture
def pool():
    """Collects actors to kill after the test."""
    started: list = []
    yield started
    for a in started:
        ray.kill(a, no_restart=True)


def _spawn(pool, name, wrapped, count=1):
    got = [_Loader.remote(name, [wrapped]) for _ in range(count)]
    pool.extend(got)
    ray.get([a.load_uss_growth.remote() for a in got])  # returns once each has loaded
    return got


def _shm_files(model) -> list[str]:
    """The /dev/shm paths of a model's shared storages (the file_system strategy's names)."""
    handles = {t.untyped_storage()._share_filename_cpu_()[1] for _, t in probes.named_tensors(model)}
    return sorted("/dev/shm" + h.decode() for h in handles)


def _assert_mixed_outputs(actor) -> None:
    inputs = MIXED.inputs()
    expected = MIXED.run(MIXED.build(), inputs)
    got = ray.get(actor.apply.remote(_outputs, inputs))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


# ---- contract --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(NEW))
def test_follows_contract_and_declares_honestly(name):
    impl = load_implementation(name)
    assert isinstance(impl, Implementation) and impl.name == name and impl.spec == REGISTRY[name]
    caps = impl.capabilities
    assert caps.cpu and not caps.cuda and not caps.task_mode
    assert not caps.multi_node  # a local file or /dev/shm: nothing reaches another node
    assert caps.write_policy == NEW[name]
    dist = {"safetensors": "safetensors", "tensorizer": "tensorizer"}.get(name)
    assert impl.version == (importlib.metadata.version(dist) if dist else torch.__version__)


@pytest.mark.parametrize("name", sorted(NEW))
def test_refuses_what_it_cannot_load(name):
    impl = load_implementation(name)
    with pytest.raises(ValueError, match="no nn.Module"):
        impl.wrap({"table": torch.ones(4)})
    with pytest.raises(ValueError, match="task"):
        impl.wrap(torch.nn.Linear(4, 4), "task")
    locked = torch.nn.Sequential(torch.nn.Linear(4, 4))
    locked[0].config = {"guards": [threading.Lock()]}
    with pytest.raises(TypeError, match=r"0\.config\['guards'\]\[0\]"):
        impl.wrap(locked)
    wrapped = impl.wrap(torch.nn.Linear(4, 4))
    try:
        with pytest.raises(ValueError, match="cuda:7"):
            impl.load(wrapped, "cuda:7")
    finally:
        release(impl, wrapped)


# ---- each adapter in real actors ---------------------------------------------------


def test_safetensors_maps_the_file_privately(ray_session, pool):
    impl = load_implementation("safetensors")
    wrapped = impl.wrap(MIXED.build())
    try:
        a, b = _spawn(pool, "safetensors", wrapped, 2)
        _assert_mixed_outputs(a)
        backing = ray.get(a.apply.remote(_backing))
        assert set(backing) == {"rw-p model.safetensors"}, backing  # MAP_PRIVATE view of the file's pages
        assert backing["rw-p model.safetensors"] > 4 * MiB
        layout = ray.get(a.apply.remote(_layout))
        assert layout["tied_same_object"] and layout["block_dtype"] == "torch.bfloat16"
        assert layout["non_persistent"] == ["scale"] and layout["buffers_are_parameters"] == []
        # The format stores contiguous tensors only: strided layouts are lost.
        assert not layout["conv_channels_last"] and layout["proj_t_stride"] == (256, 1)
        # Copy-on-write: the writer alone sees its write; the file and later actors keep the original.
        before = ray.get(b.apply.remote(_first_weight))
        assert ray.get(a.apply.remote(_write_first_weight)) == 1234.5
        assert ray.get(b.apply.remote(_first_weight)) == before != 1234.5
        (c,) = _spawn(pool, "safetensors", wrapped)
        assert ray.get(c.apply.remote(_first_weight)) == before
    finally:
        release(impl, wrapped)
    assert not os.path.exists(wrapped.path)


def test_tensorizer_loads_private_copies(ray_session, pool):
    impl = load_implementation("tensorizer")
    wrapped = impl.wrap(MIXED.build())
    try:
        a, b = _spawn(pool, "tensorizer", wrapped, 2)
        _assert_mixed_outputs(a)
        backing = ray.get(a.apply.remote(_backing))
        assert set(backing) == {"rw-p [anon]"}, backing  # heap copies: no file mapping, no object store
        layout = ray.get(a.apply.remote(_layout))
        # What write_module/load_into_module do to a model (tensorizer 2.12.1).
        assert not layout["tied_same_object"]
        assert layout["non_persistent"] == []
        assert set(layout["buffers_are_parameters"]) >= {"scale", "bn.running_mean", "bn.running_var"}
        assert not layout["conv_channels_last"] and layout["proj_t_stride"] == (256, 1)
        assert layout["block_dtype"] == "torch.bfloat16"
        before = ray.get(b.apply.remote(_first_weight))
        ray.get(a.apply.remote(_write_first_weight))
        assert ray.get(b.apply.remote(_first_weight)) == before != 1234.5
    finally:
        release(impl, wrapped)
    assert not os.path.exists(wrapped.path)


def test_torch_shm_shares_one_copy_and_writes(ray_session, pool):
    impl = load_implementation("torch-shm")
    strategy = torch.multiprocessing.get_sharing_strategy()
    model = MIXED.build()
    wrapped = impl.wrap(model)
    assert torch.multiprocessing.get_sharing_strategy() == strategy  # set only while pickling
    assert all(t.is_shared() for _, t in probes.named_tensors(model))  # the driver's model is the one copy
    assert len(wrapped.payload) < 64 * 1024  # names of files, not bytes
    try:
        a, b = _spawn(pool, "torch-shm", wrapped, 2)
        _assert_mixed_outputs(a)
        backing = ray.get(a.apply.remote(_backing))
        assert set(backing) == {"rw-s torch_*"}, backing
        layout = ray.get(a.apply.remote(_layout))
        assert layout["tied_same_object"] and layout["conv_channels_last"] and layout["proj_t_stride"] == (1, 256)
        assert layout["block_dtype"] == "torch.bfloat16" and layout["non_persistent"] == ["scale"]
        # MAP_SHARED: a write reaches every actor and the driver (write_policy "shared").
        ray.get(a.apply.remote(_write_first_weight))
        assert ray.get(b.apply.remote(_first_weight)) == 1234.5 == float(model.embed.weight.detach()[0, 0])
    finally:
        release(impl, wrapped)


def test_torch_shm_file_references_survive_many_readers(ray_session, pool):
    """Each load keeps the wrapper's file reference, so readers that come and go never unlink the files early."""
    impl = load_implementation("torch-shm")
    model = blob_case(2).build()
    wrapped = impl.wrap(model)
    files = _shm_files(model)
    expected = _first_param(model)
    a, b = _spawn(pool, "torch-shm", wrapped, 2)
    ray.get([a.drop.remote(), b.drop.remote()])  # two readers gone, gracefully
    assert all(os.path.exists(f) for f in files)
    (c,) = _spawn(pool, "torch-shm", wrapped)
    assert ray.get(c.apply.remote(_first_param)) == expected
    ray.get(c.drop.remote())
    release(impl, wrapped)
    del model
    gc.collect()
    assert not any(os.path.exists(f) for f in files)  # no reader, no wrapper, no driver model: unlinked


@pytest.mark.parametrize("name", sorted(NEW))
def test_private_memory_of_a_second_actor(ray_session, pool, name):
    """A second actor that loads and runs a 16 MiB model holds a private copy only with tensorizer."""
    impl = load_implementation(name)
    case = blob_case(16)
    wrapped = impl.wrap(case.build())
    try:
        growth = []
        for _ in range(2):  # one after the other: the second finds the pages the first touched
            (a,) = _spawn(pool, name, wrapped)
            growth.append(ray.get(a.load_uss_growth.remote()) + ray.get(a.apply.remote(_forward_uss, case.inputs())))
        if NEW[name] == "copy":
            assert growth[1] > 15 * MiB, growth
        else:
            assert growth[1] < 4 * MiB, growth
    finally:
        release(impl, wrapped)
