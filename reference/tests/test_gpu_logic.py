"""The reference's GPU path: its logic with fabricated inputs here, its physics where CUDA exists.

CPU tests stand CPU tensors in for exported device storages, so device resolution,
owner naming, lease bookkeeping, the errors and the view/tie rebuilding run end to end
on any machine. Tests named ``test_gpu_*`` need CUDA and are skipped without it.
"""

from __future__ import annotations

import gc
import os
import time

import pytest
import ray
import torch
from torch import nn

from zcbench.reference import DeviceUnavailableError, IsolationUnavailableError, ModelLostError, ModelWrapper, gpu
from zcbench.reference.packing import ALIGNMENT, pack, plan

import _refhelp as rh

MiB = 2**20
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


# --- fabricated inputs -------------------------------------------------------------------


class Tied(nn.Module):
    """Tied weights, a buffer that is a strided view of a parameter, a zero-size tensor, mixed dtypes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight  # tie
        self.register_buffer("diag_view", self.embed.weight.data[::2, 1:9])
        self.register_buffer("empty", torch.zeros(0))
        self.small = nn.Parameter(torch.randn(16, dtype=torch.float16))

    def forward(self, x):
        return self.head(self.embed(x)) + self.small.float().sum()


class FakeOwner:
    """An owner that lends one CPU buffer laid out as the device buffer would be (standing in for device memory)."""

    def __init__(self, payload, dead: bool = False):
        self.buffer, self.extents = gpu.copy_segments(payload.segment_arrays(), torch.device("cpu"))
        self.handle = self.buffer if self.buffer.numel() else None
        self.leases = gpu.Leases()
        self.dead = dead
        self.released: list[int] = []
        self.exports = 0

    def acquire(self, pid):
        if self.dead:
            raise ModelLostError("the GPU owner of these weights died: fabricated")
        self.exports += 1
        return self.leases.acquire(pid), self.handle, self.extents

    def release(self, lease):
        self.released.append(lease)
        self.leases.release(lease)


def fake_rebuild(handle, device):
    return handle.untyped_storage()


# --- pure logic ----------------------------------------------------------------------------


def test_owner_name_is_per_node_gpu_and_wrapper():
    a = gpu.owner_name("n1", "1234-ab", "ff00")
    assert a == "zc-gpu-owner:n1:GPU-1234-ab:ff00"
    assert a == gpu.owner_name("n1", "GPU-1234-ab", "ff00")  # torch and nvidia-smi spellings meet
    names = {gpu.owner_name(n, u, r) for n in ("n1", "n2") for u in ("GPU-a", "GPU-b") for r in ("r1", "r2")}
    assert len(names) == 8
    assert gpu.normalize_uuid("MIG-xyz") == "MIG-xyz"


@pytest.mark.parametrize(
    ("device", "ray_ids", "visible", "current", "expected"),
    [
        ("cuda:1", ["3"], "3", 0, 1),  # an explicit index wins
        ("cuda", ["3"], "3", 0, 0),  # Ray's GPU 3, seen as index 0 in this actor
        ("cuda", ["2"], "0,1,2,3", 0, 2),  # workers that see the whole node
        ("cuda", [2], None, 0, 2),  # no CUDA_VISIBLE_DEVICES: Ray's id is the index
        ("cuda", ["GPU-u2"], "GPU-u1,GPU-u2", 0, 1),  # nodes listing GPUs by UUID
        ("cuda", [], None, 5, 5),  # no Ray GPU: the current device
        ("cuda", [0], "", 0, 0),  # fractional actors share the same id: the same index
    ],
)
def test_device_resolution(device, ray_ids, visible, current, expected):
    got = gpu.resolve_index(torch.device(device), ray_gpu_ids=ray_ids, visible=visible, current=lambda: current)
    assert got == expected


def test_device_resolution_errors():
    with pytest.raises(DeviceUnavailableError, match="does not list"):
        gpu.local_index("4", "0,1")
    with pytest.raises(DeviceUnavailableError):
        gpu.resolve_index(torch.device("cpu"), ray_gpu_ids=[], visible=None, current=lambda: 0)


def test_default_device_follows_ray_gpus():
    assert gpu.default_device(["0"], cuda_available=True) == "cuda"
    assert gpu.default_device([], cuda_available=True) is None
    assert gpu.default_device(["0"], cuda_available=False) is None  # CPU torch on a GPU node: stay on the CPU


@pytest.mark.parametrize(
    ("conf", "on", "stripped"),
    [
        (None, False, None),
        ("", False, None),
        ("expandable_segments:True", True, None),
        ("max_split_size_mb:128, expandable_segments:true", True, "max_split_size_mb:128"),
        ("expandable_segments:False,garbage_collection_threshold:0.6", False, "garbage_collection_threshold:0.6"),
        ("expandable_segments:1", True, None),
    ],
)
def test_expandable_segments_detection(conf, on, stripped):
    assert gpu.expandable_segments_requested(conf) is on
    assert gpu.without_expandable_segments(conf) == stripped


def test_isolation_policy():
    assert gpu.check_isolation("auto") == "shared"
    assert gpu.check_isolation("shared") == "shared"
    assert gpu.check_isolation("copy") == "copy"
    with pytest.raises(IsolationUnavailableError, match="copy-on-write"):
        gpu.check_isolation("cow")
    with pytest.raises(ValueError):
        gpu.check_isolation("nope")


def test_lease_book():
    book = gpu.Leases()
    assert not book.finished  # a fresh owner waits for its first consumer
    a, b, c = book.acquire(10), book.acquire(11), book.acquire(12)
    assert len({a, b, c}) == 3 and len(book) == 3
    assert book.release(a) is False
    assert book.release(a) is False  # twice is harmless
    assert book.reap(lambda pid: pid != 11) == [b]
    assert book.release(c) is True and book.finished
    assert book.should_close(0.0)


def test_unused_owner_leaves_after_grace():
    book = gpu.Leases()
    assert not book.should_close(10.0, grace_s=60.0)  # its first consumer may still be coming
    assert book.should_close(61.0, grace_s=60.0)  # that consumer died before taking its lease
    book.acquire(1)
    assert not book.should_close(1e9, grace_s=60.0)  # a live lease keeps it however long


def test_consumer_lease_counts_storages():
    calls = []
    lease = gpu.ConsumerLease(lambda: calls.append(1), 3)
    lease.drop_one()
    lease.drop_one()
    assert calls == [] and not lease.released
    lease.drop_one()
    assert calls == [1] and lease.released
    lease.release_now()
    assert calls == [1]  # released once only
    failing = gpu.ConsumerLease(lambda: 1 / 0, 1)
    failing.drop_one()  # Ray gone at exit: swallowed, the owner's reaper cleans up
    assert failing.released


def test_views_ties_and_lease_end_to_end():
    original = Tied()
    payload, _ = pack(original)
    owner = FakeOwner(payload)
    model = gpu.load_shared(payload, torch.device("cpu"), owner, fake_rebuild)

    assert model.head.weight is model.embed.weight
    assert isinstance(model.small, nn.Parameter) and model.small.dtype == torch.float16
    assert model.diag_view.stride() == original.diag_view.stride()
    assert model.diag_view.untyped_storage().data_ptr() == model.embed.weight.untyped_storage().data_ptr()
    # Every weight lives inside the one buffer the owner lent: nothing was copied.
    lo = owner.buffer.data_ptr()
    hi = lo + owner.buffer.numel()
    for t in (model.embed.weight, model.small, model.diag_view):
        assert lo <= t.untyped_storage().data_ptr() < hi
        assert t.untyped_storage().nbytes() < owner.buffer.numel()  # its own storage, not the whole buffer
    del t
    assert owner.exports == 1  # one handle per consumer, whatever the tensor count
    x = torch.randint(0, 64, (5,))
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert model.empty.numel() == 0
    assert len(owner.leases) == 1

    # The lease lasts as long as any view does, then ends exactly once.
    view = model.diag_view
    del model
    owner.handle = owner.buffer = None  # the fake owner's own references would keep the buffer alive
    gc.collect()
    assert owner.released == [] and len(owner.leases) == 1
    del view
    gc.collect()
    assert owner.released == [1] and owner.leases.finished


def test_dead_owner_is_model_lost():
    payload, _ = pack(Tied())
    with pytest.raises(ModelLostError, match="died"):
        gpu.load_shared(payload, torch.device("cpu"), FakeOwner(payload, dead=True), fake_rebuild)

    class Closing(FakeOwner):
        def acquire(self, pid):
            return None

    with pytest.raises(ModelLostError, match="shutting down"):
        gpu.load_shared(payload, torch.device("cpu"), Closing(payload), fake_rebuild)


@pytest.mark.parametrize(
    "lengths",
    [[], [0], [1], [4096, 1, 255, 256, 257, 0, 3 * 2**20], [7] * 50, [2**20 + 3, 2**16, 5]],
    ids=["none", "empty", "one-byte", "mixed", "many-odd", "big-and-small"],
)
def test_device_layout_aligns_and_never_overlaps(lengths):
    extents, total = gpu.device_layout(lengths)
    assert [n for _, n in extents] == lengths
    end = 0
    for offset, n in extents:
        assert offset % 256 == 0 and offset >= end  # in order, aligned, no overlap
        end = offset + n
    assert total == end <= sum(lengths) + 256 * len(lengths)


class AllDTypes(nn.Module):
    """Small tensors of every dtype (so they are packed together), with odd element counts."""

    DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
              torch.bool, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.complex64,
              torch.complex128)

    def __init__(self):
        super().__init__()
        for i, dtype in enumerate(self.DTYPES):
            self.register_buffer(f"t{i}", torch.arange(3 + 2 * i, dtype=torch.float32).to(dtype))
        self.big = nn.Parameter(torch.randn(128, 256, dtype=torch.float64))  # a segment of its own


def test_every_storage_is_aligned_in_the_device_buffer():
    payload, _ = pack(AllDTypes())
    places = payload.places
    assert len(payload.segments) == 2  # one pack of the 14 small buffers, one own segment
    extents, total = gpu.device_layout([int(a.nbytes) for a in payload.segment_arrays()])
    for segment, offset, _ in places:
        address = extents[segment][0] + offset
        assert address % ALIGNMENT == 0 and ALIGNMENT % 16 == 0  # 16: the largest itemsize (complex128)
    buffer, _ = gpu.copy_segments(payload.segment_arrays(), torch.device("cpu"))
    assert buffer.numel() == total  # one allocation holds the whole model
    model = gpu.load_shared(payload, torch.device("cpu"), FakeOwner(payload), fake_rebuild)
    original = AllDTypes()
    for name, t in original.named_buffers():
        got = getattr(model, name)
        assert got.dtype == t.dtype and got.data_ptr() % got.element_size() == 0
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)), name


def test_plan_packs_small_storages_and_keeps_big_ones_whole():
    sizes = [10, 2**20, 0, 64 * 1024 - 1, 64 * 1024, 300, 5 * 2**20]
    places, segments = plan(sizes, limit=256 * 1024)
    for n, (segment, offset, nbytes) in zip(sizes, places):
        assert nbytes == n and offset % ALIGNMENT == 0
        assert offset + n <= segments[segment].length
        assert segments[segment].pack == (n < 64 * 1024)
        if not segments[segment].pack:
            assert offset == 0 and segments[segment].length == n
    packs = [s for s in segments if s.pack]
    assert all(s.length % 4096 == 0 and s.length <= 256 * 1024 for s in packs)
    # Within a pack, storages never overlap.
    for index in range(len(segments)):
        spans = sorted((o, o + n) for (seg, o, n) in places if seg == index)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_plan_bounds_every_pack():
    sizes = [4096] * 1000  # 4 MiB of small storages, packs of at most 1 MiB
    places, segments = plan(sizes, limit=2**20)
    assert len(segments) == 4 and all(s.pack and s.length <= 2**20 for s in segments)
    assert len({(seg, off) for seg, off, _ in places}) == 1000


def test_mismatched_export_is_model_lost():
    payload, _ = pack(Tied())

    class Wrong(FakeOwner):
        def acquire(self, pid):
            lease, handle, extents = super().acquire(pid)
            return lease, handle, extents[:-1]

    with pytest.raises(ModelLostError, match="segments"):
        gpu.load_shared(payload, torch.device("cpu"), Wrong(payload), fake_rebuild)


class OnlyEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(0, 4))


def test_empty_model_needs_no_export_and_ends_its_lease():
    payload, _ = pack(OnlyEmpty())
    owner = FakeOwner(payload)
    assert owner.handle is None
    model = gpu.load_shared(payload, torch.device("cpu"), owner, fake_rebuild)
    assert model.w.shape == (0, 4) and isinstance(model.w, nn.Parameter)
    assert owner.released == [1]  # nothing to keep alive


def test_private_copy_keeps_layout():
    original = Tied()
    payload, _ = pack(original)
    storages = gpu.private_copy(payload, torch.device("cpu"))
    assert [s.nbytes() for s in storages] == [int(s.nbytes) for s in payload.storages]
    assert len({s.data_ptr() for s in storages if s.nbytes()}) == len([s for s in storages if s.nbytes()])
    from zcbench.reference.unpacking import unpack

    model = unpack(payload, storages, torch.device("cpu"))
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.diag_view, original.diag_view)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_cpu_node_is_device_unavailable(ray_session):
    wrapper = ModelWrapper.from_model(Tied())
    for device in ("cuda", "cuda:0", torch.device("cuda", 3)):
        with pytest.raises(DeviceUnavailableError, match="cuda"):
            wrapper.load(device=device)
    assert gpu.default_here() is None  # no Ray GPU here: load() stays on the CPU
    model = wrapper.load()
    assert model.embed.weight.device.type == "cpu"


def test_import_makes_no_cuda_call():
    # Importing the GPU module on a CPU-only machine must not start CUDA.
    import subprocess
    import sys

    code = "import torch, zcbench.reference.gpu, zcbench.reference; print(torch.cuda.is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip().endswith("False")


# --- on a GPU -----------------------------------------------------------------------------


@ray.remote(num_cpus=0.01)
class GpuHolder:
    """Starts its CUDA context first (so it is not counted as weights), then loads on request."""

    def __init__(self):
        torch.empty(1, device="cuda")
        self.model = None

    def load(self, wrapper_box, **kwargs):
        start = time.perf_counter()
        self.model = wrapper_box[0].load(**kwargs)
        torch.cuda.synchronize()
        return {"load_s": time.perf_counter() - start, "allocated": torch.cuda.memory_allocated(), "pid": os.getpid()}

    def run(self, x):
        with torch.no_grad():
            return self.model(x.to(next(self.model.parameters()).device)).cpu()

    def write(self):
        with torch.no_grad():
            next(self.model.parameters()).add_(1)
        torch.cuda.synchronize()

    def drop(self):
        self.model = None
        gc.collect()
        return torch.cuda.memory_allocated()

    def span(self):
        """Where the model's storages lie: lowest start, highest end, how many."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.model.parameters()}
        return {"lo": min(storages), "hi": max(p + n for p, n in storages.items()), "storages": len(storages)}


class Blob(nn.Module):
    def __init__(self, mib: int):
        super().__init__()
        self.w = nn.Linear(1024, mib * MiB // 4096, bias=False)
        self.tied = self.w  # a second path to the same weight

    def forward(self, x):
        return self.w(x).sum(-1)


class ManyTensors(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(1024)) for _ in range(n))

    def forward(self, x):
        return torch.stack([x @ t for t in self.tensors], dim=1)


def _owners() -> list[dict]:
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("zc-gpu-owner:")]


def _owner_stats() -> list[dict]:
    return [ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).stats.remote()) for a in _owners()]


def _wait_no_owner(timeout_s: float = 30.0) -> bool:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if not _owners():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture
def gpu_pool(ray_session):
    rh.register(__name__)
    holders = []

    def make(count: int, env: dict | None = None):
        opts = {"num_gpus": 1 / count}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        holders.extend(GpuHolder.options(**opts).remote() for _ in range(count))
        return holders[-count:]

    yield make
    for h in holders:
        ray.kill(h, no_restart=True)
    _wait_no_owner()


@needs_cuda
def test_gpu_one_copy_per_gpu(gpu_pool):
    original = Blob(256)
    nbytes = 256 * MiB
    wrapper = ModelWrapper.from_model(original)
    pool = gpu_pool(4)
    reports = [ray.get(h.load.remote([wrapper], device="cuda")) for h in pool]
    for r in reports:  # consumers map; they allocate nothing themselves
        assert r["allocated"] < 16 * MiB, reports
    owners = _owner_stats()
    assert len(owners) == 1, owners  # one owner for four actors on one GPU
    assert nbytes <= owners[0]["allocated"] < 1.1 * nbytes
    assert owners[0]["leases"] == 4
    x = torch.randn(3, 1024)
    with torch.no_grad():
        expected = original.cuda()(x.cuda()).cpu()
    for out in ray.get([h.run.remote(x) for h in pool]):
        assert torch.equal(out, expected)


@needs_cuda
def test_gpu_many_tensors_one_exported_buffer(gpu_pool):
    torch.manual_seed(1)
    original = ManyTensors(2000)
    nbytes = 2000 * 1024 * 4
    wrapper = ModelWrapper.from_model(original)
    (holder,) = gpu_pool(1)
    report = ray.get(holder.load.remote([wrapper], device="cuda"))
    assert report["allocated"] < 16 * MiB
    span = ray.get(holder.span.remote())
    (owner,) = _owner_stats()
    assert span["storages"] == 2000
    assert span["hi"] - span["lo"] <= owner["nbytes"]  # all 2,000 storages inside the one exported buffer
    assert nbytes <= owner["nbytes"] < nbytes + 2 * MiB
    x = torch.randn(4, 1024)
    with torch.no_grad():
        expected = original.cuda()(x.cuda()).cpu()
    assert torch.equal(ray.get(holder.run.remote(x)), expected)


@needs_cuda
def test_gpu_last_release_ends_owner(gpu_pool):
    wrapper = ModelWrapper.from_model(Blob(16))
    pool = gpu_pool(2)
    for h in pool:
        ray.get(h.load.remote([wrapper], device="cuda"))
    assert len(_owners()) == 1
    ray.get(pool[0].drop.remote())
    time.sleep(1)
    assert _owner_stats()[0]["leases"] == 1
    ray.kill(pool[1], no_restart=True)  # a dead consumer's lease is reaped by pid
    assert _wait_no_owner(3 * gpu.REAP_INTERVAL_S + 10), _owners()


@needs_cuda
def test_gpu_owner_death_and_recovery(gpu_pool):
    original = Blob(16)
    wrapper = ModelWrapper.from_model(original)
    first, second = gpu_pool(2)
    ray.get(first.load.remote([wrapper], device="cuda"))
    (owner,) = _owners()
    ray.kill(ray.get_actor(owner["name"], namespace=owner["namespace"]), no_restart=True)
    time.sleep(2)
    # A later load starts a fresh owner from the object store and computes exactly.
    ray.get(second.load.remote([wrapper], device="cuda"))
    x = torch.randn(2, 1024)
    with torch.no_grad():
        expected = original.cuda()(x.cuda()).cpu()
    assert torch.equal(ray.get(second.run.remote(x)), expected)


@needs_cuda
def test_gpu_write_policy(gpu_pool):
    original = Blob(16)
    wrapper = ModelWrapper.from_model(original)
    x = torch.randn(2, 1024)
    with torch.no_grad():
        expected = original.cuda()(x.cuda()).cpu()
    shared_a, shared_b, copy_a, copy_b = gpu_pool(4)
    ray.get([h.load.remote([wrapper], device="cuda") for h in (shared_a, shared_b)])
    ray.get([h.load.remote([wrapper], device="cuda", isolation="copy") for h in (copy_a, copy_b)])
    ray.get(shared_a.write.remote())
    assert not torch.equal(ray.get(shared_b.run.remote(x)), expected)  # declared: shared writes are seen
    assert torch.equal(ray.get(copy_a.run.remote(x)), expected)  # copies never see them
    ray.get(copy_a.write.remote())
    assert torch.equal(ray.get(copy_b.run.remote(x)), expected)
    with pytest.raises(ray.exceptions.RayTaskError, match="IsolationUnavailableError"):
        ray.get(copy_b.load.remote([wrapper], device="cuda", isolation="cow"))


@needs_cuda
def test_gpu_expandable_segments_consumers(gpu_pool):
    original = Blob(16)
    wrapper = ModelWrapper.from_model(original)
    pool = gpu_pool(2, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    for h in pool:
        ray.get(h.load.remote([wrapper], device="cuda"))
    x = torch.randn(2, 1024)
    with torch.no_grad():
        expected = original.cuda()(x.cuda()).cpu()
    for out in ray.get([h.run.remote(x) for h in pool]):
        assert torch.equal(out, expected)


@needs_cuda
def test_gpu_default_device_is_ray_gpu(gpu_pool):
    wrapper = ModelWrapper.from_model(Blob(16))
    (h,) = gpu_pool(1)
    ray.get(h.load.remote([wrapper]))
    assert ray.get(h.run.remote(torch.randn(1, 1024))).shape == (1,)
    assert len(_owners()) == 1
