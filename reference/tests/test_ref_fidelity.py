"""Fidelity: storages stored once, dtypes and layouts bit-exact, module structure and flags intact; pipelines."""

from __future__ import annotations

import _refhelp as h
import ray
import torch
from torch import nn

from zcbench.reference import ModelWrapper
from zcbench.suites.equality import assert_same

h.register(__name__)

ROWS = 64 * 1024  # every storage below is over 100 KiB, so none is inlined by Ray


class Exotic(nn.Module):
    """Tied head, odd dtypes, views into one storage, strided and channels_last weights, mixed modes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(512, 64)
        self.lm_head = nn.Linear(64, 512, bias=False)
        self.lm_head.weight = self.embed.weight
        self.conv = nn.Conv2d(32, 64, 5).to(memory_format=torch.channels_last)
        self.strided = nn.Parameter(torch.randn(256, 512).t())  # non-contiguous
        self.frozen = nn.Parameter(torch.randn(ROWS), requires_grad=False)
        self.drop = nn.Dropout(0.1)
        base = torch.randn(4 * ROWS)
        self.register_buffer("whole", base)
        self.register_buffer("tail", base[ROWS:3 * ROWS:2])  # offset + stride into the same storage
        self.register_buffer("cache", torch.randn(ROWS), persistent=False)
        g = torch.Generator().manual_seed(7)
        self.register_buffer("bf16", torch.randn(ROWS, generator=g).to(torch.bfloat16))
        self.register_buffer("f16", torch.randn(ROWS, generator=g).to(torch.float16))
        self.register_buffer("f8", torch.randn(ROWS, generator=g).to(torch.float8_e4m3fn))
        self.register_buffer("f8b", torch.randn(ROWS, generator=g).to(torch.float8_e5m2))
        self.register_buffer("flags", torch.rand(4 * ROWS, generator=g) > 0.5)
        self.register_buffer("i8", torch.randint(-128, 127, (2 * ROWS,), dtype=torch.int8, generator=g))
        self.register_buffer("u8", torch.randint(0, 255, (2 * ROWS,), dtype=torch.uint8, generator=g))
        self.register_buffer("i32", torch.randint(-(2**31), 2**31 - 1, (ROWS,), dtype=torch.int32, generator=g))
        self.register_buffer("i64", torch.randint(-(2**62), 2**62, (ROWS,), dtype=torch.int64, generator=g))
        self.register_buffer("c64", torch.randn(ROWS, dtype=torch.complex64, generator=g))
        self.register_buffer("c128", torch.randn(ROWS, dtype=torch.complex128, generator=g))
        nan = torch.full((ROWS,), float("nan"))
        nan.view(torch.int32)[::3] = 0x7FC00123  # NaN payloads must survive bit for bit
        self.register_buffer("nans", nan)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.embed(tokens))
        return self.lm_head(h).sum() + self.conv(image).sum() + (self.strided @ torch.ones(256)).sum()


def build_exotic() -> nn.Module:
    torch.manual_seed(11)
    model = Exotic().eval()
    model.drop.train()  # train/eval per submodule must survive
    return model


def _unique_storages(model: nn.Module) -> tuple[int, int]:
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return len(seen), sum(seen.values())


def _describe(model: nn.Module) -> dict:
    storages = {}
    for name, t in h.probes.named_tensors(model):
        storages.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    return {
        "fingerprints": h.fingerprints(model),
        "state_dict_keys": list(model.state_dict().keys()),
        "param_names": [n for n, _ in model.named_parameters(remove_duplicate=False)],
        "buffer_names": [n for n, _ in model.named_buffers(remove_duplicate=False)],
        "non_persistent": sorted(n for n, m in model.named_modules() for n in m._non_persistent_buffers_set),
        "training": {n: m.training for n, m in model.named_modules()},
        "storage_groups": sorted(sorted(v) for v in storages.values()),
        "tied_is_same": model.lm_head.weight is model.embed.weight,
        "type": type(model).__name__,
    }


def _grad_wrt_input(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (model.lm_head(model.embed.weight[:4] * x)).square().sum().backward()
    return x.grad


def test_one_copy_per_storage_and_exact_fidelity(ray_session):
    original = build_exotic()
    wrapper = ModelWrapper.from_model(original)
    count, nbytes = _unique_storages(original)
    assert (wrapper.info.num_storages, wrapper.info.nbytes) == (count, nbytes)
    payload = ray.get(wrapper.ref)
    assert len(payload.storages) == count and sum(s.nbytes for s in payload.storages) == nbytes
    expected = _describe(original)
    [holder] = h.spawn(wrapper)
    try:
        got = ray.get(holder.apply.remote(_describe))
        where = ray.get(holder.apply.remote(h.residency))
    finally:
        h.kill([holder])
    assert got["tied_is_same"], "lm_head.weight is not embed.weight after load"
    # "whole"/"tail" share one storage, embed/lm_head another: the grouping must be the original's.
    assert got["storage_groups"] == expected["storage_groups"]
    for name, fp in expected["fingerprints"].items():
        assert got["fingerprints"][name] == fp, f"{name}: {got['fingerprints'][name]} != {fp}"
    assert got == expected
    assert where["storages"] == count and where["outside"] == []


def test_autograd_with_respect_to_inputs(ray_session):
    original = build_exotic()
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(4))
    with h.like_actor():
        expected = _grad_wrt_input(original, x)
    [holder] = h.spawn(ModelWrapper.from_model(original))
    try:
        got = ray.get(holder.apply.remote(_grad_wrt_input, x))
    finally:
        h.kill([holder])
    assert got is not None and torch.equal(got, expected)


class Encoder(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return torch.tanh(self.proj(x))


class Stage:
    """A plain object holding modules deeper down."""

    def __init__(self, inner):
        self.inner = {"block": inner}


class Pipeline:
    """Modules on attributes, in a list, a tuple, a dict, a nested object; ``shared`` appears twice."""

    def __init__(self):
        torch.manual_seed(21)
        self.shared = Encoder()
        self.stages = [Encoder(), self.shared]
        self.pair = (Encoder(), nn.LayerNorm(256))
        self.heads = {"a": nn.Linear(256, 256), "b": nn.Linear(256, 128)}
        self.deep = Stage(Encoder())
        self.scale = 0.5

    def __call__(self, x):
        for stage in self.stages:
            x = stage(x)
        x = self.pair[1](self.pair[0](x))
        x = self.deep.inner["block"](x + self.shared(x) * self.scale)
        return {k: head(x) for k, head in self.heads.items()}

    def structure(self):
        return {
            "shared_is_stage": self.stages[1] is self.shared,
            "types": [type(self.pair).__name__, type(self.stages).__name__, type(self.heads).__name__],
        }


def _pipeline_report(pipe, x):
    with torch.no_grad():
        out = pipe(x)
    return out, pipe.structure()


def test_pipeline_structures_and_shared_module(ray_session):
    pipe = Pipeline()
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(8))
    with h.like_actor():
        expected, structure = _pipeline_report(pipe, x)
    wrapper = ModelWrapper.from_model(pipe)
    modules = [pipe.shared, pipe.stages[0], *pipe.pair, *pipe.heads.values(), pipe.deep.inner["block"]]
    assert wrapper.info.num_storages == sum(len(list(m.parameters())) for m in modules)  # shared stored once
    [holder] = h.spawn(wrapper)
    try:
        got, got_structure = ray.get(holder.apply.remote(_pipeline_report, x))
        where = ray.get(holder.apply.remote(h.residency))
    finally:
        h.kill([holder])
    assert_same(got, expected)
    assert got_structure == structure and got_structure["shared_is_stage"]
    assert where["outside"] == [] and where["storages"] == wrapper.info.num_storages
