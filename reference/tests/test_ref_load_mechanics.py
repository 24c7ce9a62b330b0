"""How a load is made fast: the collector paused, storages laid out in a few buffers, pages prefaulted."""

from __future__ import annotations

import gc
import os
import time

import _refhelp as h
import pytest
import ray
import torch
from torch import nn

from zcbench.reference import IsolationUnavailableError, ModelWrapper, wrapper as wrapper_module
from zcbench.reference.packing import ALIGNMENT, pack_limit, split
from zcbench.suites import models as cases

h.register(__name__)


# --- the cyclic collector ------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False], ids=["gc-on", "gc-off"])
def test_collector_paused_during_load_and_restored(ray_session, monkeypatch, enabled):
    wrapper = ModelWrapper.from_model(nn.Linear(4, 4))
    seen = []
    real_unpack = wrapper_module.unpack_buffers

    def spying(*args, **kwargs):
        seen.append(gc.isenabled())
        return real_unpack(*args, **kwargs)

    monkeypatch.setattr(wrapper_module, "unpack_buffers", spying)
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        model = wrapper.load()
        assert seen == [False], "the collector ran during the load"
        assert gc.isenabled() is enabled, "the caller's collector setting was not restored"
        assert isinstance(model, nn.Linear)
    finally:
        gc.enable() if was else gc.disable()


@pytest.mark.parametrize("enabled", [True, False], ids=["gc-on", "gc-off"])
def test_collector_restored_when_load_raises(ray_session, monkeypatch, enabled):
    wrapper = ModelWrapper.from_model(nn.Linear(4, 4))
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        # A refusal on the way (no copy-on-write possible here, and "cow" demanded) ...
        monkeypatch.setenv("ZCBENCH_DISABLE_COW", "1")
        with pytest.raises(IsolationUnavailableError):
            wrapper.load(isolation="cow")
        assert gc.isenabled() is enabled
        monkeypatch.delenv("ZCBENCH_DISABLE_COW")

        # ... and a failure while the skeleton is rebuilt.
        def broken(*args, **kwargs):
            raise RuntimeError("rebuilding failed")

        monkeypatch.setattr(wrapper_module, "unpack_buffers", broken)
        with pytest.raises(RuntimeError, match="rebuilding failed"):
            wrapper.load()
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()


# --- the layout: a few aligned buffers ------------------------------------------------------


class EveryDType(nn.Module):
    """Small tensors of every dtype with odd lengths (so they are packed side by side), views and a tie."""

    DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.complex64,
              torch.complex128)

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for i, dtype in enumerate(self.DTYPES):
            raw = torch.randint(0, 256, ((5 + 3 * i) * torch.empty(0, dtype=dtype).element_size(),), dtype=torch.uint8, generator=g)
            self.register_buffer(f"t{i}", raw.view(dtype))
        base = torch.randn(1001, generator=g, dtype=torch.float64)
        self.a = nn.Parameter(base[1:])  # a view at an odd element offset
        self.register_buffer("b", base[::7])
        self.head = nn.Linear(3, 3)
        self.tail = nn.Linear(3, 3)
        self.tail.weight = self.head.weight
        self.big = nn.Parameter(torch.randn(300, 300, generator=g))  # a segment of its own


def _layout_report(model: nn.Module) -> dict:
    from zcbench.suites import probes

    out = {}
    for name, t in probes.named_tensors(model):
        s = t.untyped_storage()
        out[name] = {
            "fingerprint": h.fingerprint(t),
            "elem_aligned": t.data_ptr() % t.element_size() == 0,
            "storage_align": s.data_ptr() % 64,
            "storage": s.data_ptr(),
        }
    return out


def test_every_dtype_keeps_its_alignment_and_bytes(ray_session):
    original = EveryDType()
    packed = split(original)
    payload = packed.payload()
    assert len(payload.segments) == 2  # all small storages in one pack, the big weight on its own
    for _, offset, _ in payload.places:
        assert offset % ALIGNMENT == 0
    [holder] = h.spawn(ModelWrapper.from_model(original))
    try:
        got = ray.get(holder.apply.remote(_layout_report))
        where = ray.get(holder.apply.remote(h.residency))
        tied = ray.get(holder.apply.remote(lambda m: m.tail.weight is m.head.weight))
    finally:
        h.kill([holder])
    want = _layout_report(original)
    assert set(got) == set(want)
    for name, facts in got.items():
        assert facts["fingerprint"] == want[name]["fingerprint"], name
        assert facts["elem_aligned"], f"{name} is not aligned to its element size"
        assert facts["storage_align"] == 0, f"{name}'s storage is not 64-byte aligned"
    # Tensors share a storage exactly when they did in the original.
    groups = lambda r: sorted(sorted(n for n in r if r[n]["storage"] == p) for p in {f["storage"] for f in r.values()})  # noqa: E731
    assert groups(got) == groups(want)
    assert tied and where["outside"] == []


class ManySmall(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        torch.manual_seed(0)
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(1024)) for _ in range(n))

    def forward(self, x):
        return torch.stack([x @ t for t in self.tensors], dim=1)


def _storage_count(model: nn.Module) -> int:
    return len({p.untyped_storage().data_ptr() for p in model.parameters()})


def test_many_small_tensors_travel_in_a_few_bounded_packs(ray_session):
    n = 3000
    original = ManySmall(n)
    nbytes = n * 4096
    payload = split(original).payload()
    packs = [s for s in payload.segments if isinstance(s, ray.ObjectRef)]
    assert 8 <= len(payload.segments) <= 40, len(payload.segments)  # a few buffers, not 3,000
    assert packs, "the packs beyond the last should be in the store on their own"
    for array in payload.segment_arrays():
        assert array.nbytes <= pack_limit(nbytes)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(1))
    with h.like_actor():
        expected = h.run(original, x)
    [holder] = h.spawn(ModelWrapper.from_model(original))
    try:
        assert torch.equal(ray.get(holder.apply.remote(h.run, x)), expected)
        assert ray.get(holder.apply.remote(_storage_count)) == n  # one storage per original storage
        where = ray.get(holder.apply.remote(h.residency))
        assert where["outside"] == [] and where["bytes_in_store"] == nbytes
    finally:
        h.kill([holder])


# --- prefault: pages mapped ahead of the first forward, still shared ----------------------------


def _private_store_pages(model: nn.Module, timeout_s: float = 30.0) -> dict:
    """Resident and private bytes of this process's copy-on-write store mappings, once prefault is done."""
    nbytes = sum(p.nbytes for p in model.parameters())
    deadline = time.monotonic() + timeout_s
    while True:
        rss = private = shared = 0
        in_cow = False
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                first = line.split(maxsplit=1)[0]
                if "-" in first and not first.endswith(":"):
                    fields = line.split()
                    in_cow = "plasma" in line and fields[1].endswith("p")  # MAP_PRIVATE: ours
                elif in_cow and first == "Rss:":
                    rss += int(line.split()[1]) * 1024
                elif in_cow and first in ("Private_Clean:", "Private_Dirty:"):
                    private += int(line.split()[1]) * 1024
                elif in_cow and first in ("Shared_Clean:", "Shared_Dirty:"):
                    shared += int(line.split()[1]) * 1024
        if rss >= nbytes or time.monotonic() > deadline:
            return {"nbytes": nbytes, "rss": rss, "private": private, "shared": shared, "pid": os.getpid()}
        time.sleep(0.05)


def test_prefault_maps_every_page_and_keeps_it_shared(ray_session):
    mib = 64
    wrapper = ModelWrapper.from_model(cases.build_blob(mib))
    # A fresh worker: no mapping left over from other tests' loads.
    holder = h.Holder.options(runtime_env={"env_vars": {"ZC_TEST_FRESH": "prefault"}}).remote()
    try:
        report = ray.get(holder.load_only.remote([wrapper]))
        pages = ray.get(holder.apply.remote(_private_store_pages))
        after = ray.get(holder.apply.remote(h.memory))
    finally:
        h.kill([holder])
    # Nothing read the weights, yet every page is mapped (the first forward pass faults none) ...
    assert pages["rss"] >= pages["nbytes"], pages
    # ... and mapped shared: no page was copied into this process.
    assert pages["private"] < 2 * h.MiB and pages["shared"] >= pages["nbytes"], pages
    grown = (after["uss"] - report["before"]["uss"]) / h.MiB
    assert grown < 8, f"USS grew by {grown:.1f} MiB for a {mib} MiB model"


def test_load_returns_before_prefault_finishes(ray_session):
    """Prefault runs beside the caller: a load of 256 MiB takes no longer than one of 1 MiB, give or take."""
    small = ModelWrapper.from_model(cases.build_blob(4))
    big = ModelWrapper.from_model(cases.build_blob(256))
    [holder] = h.pool(1)
    try:
        ray.get(holder.load_only.remote([small]))  # first-load set-up of the worker
        times = {"small": [], "big": []}
        for _ in range(3):
            for key, w in (("small", small), ("big", big)):
                times[key].append(ray.get(holder.load_only.remote([w]))["load_s"])
    finally:
        h.kill([holder])
    # Mapping 256 MiB page by page takes tens of milliseconds; the load must not wait for it.
    assert min(times["big"]) < min(times["small"]) + 0.02, times


def test_prefault_falls_back_to_reading_one_byte_per_page(ray_session, monkeypatch):
    from zcbench.reference import cow

    monkeypatch.setattr(cow, "_madvise", lambda *args: -1)  # a kernel without MADV_POPULATE_READ
    model = ModelWrapper.from_model(cases.build_blob(16)).load()
    pages = _private_store_pages(model)
    assert pages["rss"] >= pages["nbytes"] and pages["private"] < 2 * h.MiB, pages


def test_store_mapping_found_without_procmap_query(ray_session, monkeypatch):
    from zcbench.reference import cow

    monkeypatch.setattr(cow, "query_mapping", lambda addr: None)  # a kernel older than 6.11
    monkeypatch.setattr(cow, "_known", [])
    original = cases.build_blob(8)
    model = ModelWrapper.from_model(original).load(isolation="cow")
    assert h.residency(model)["outside"] == []
    assert h.weight_digest(model) == h.weight_digest(original)
