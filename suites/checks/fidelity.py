"""Fidelity: a loaded model is the original, bit for bit and attribute for attribute.

Dtypes and raw bytes, tied weights, strides and views, Parameter/buffer metadata and
autograd all survive the trip through the implementation, inside a real Ray actor.
Every tensor is over 100 KiB so Ray never inlines it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from .. import hosts, probes
from ..registry import check

KiB = 1024
#: Bytes per test tensor: above Ray's 100 KiB inline limit.
TENSOR_BYTES = 160 * KiB


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The element bytes of ``t`` in logical order (works for float8, bool and complex)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().copy()


# ---------------------------------------------------------------- dtypes

DTYPES = (
    torch.bfloat16,
    torch.float16,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
    torch.bool,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.complex64,
)


def _random_of(dtype: torch.dtype, nbytes: int, g: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads and subnormals included) so any cast shows."""
    if dtype == torch.bool:
        return torch.randint(0, 2, (nbytes,), generator=g).bool()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(-1, 64)


class AllDtypes(nn.Module):
    """Floating and complex dtypes as frozen parameters, integer and bool dtypes as buffers."""

    def __init__(self, dtypes: tuple[torch.dtype, ...] = DTYPES, nbytes: int = TENSOR_BYTES):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for dtype in dtypes:
            name = "t_" + str(dtype).removeprefix("torch.")  # bare "bfloat16" would shadow Module.bfloat16
            t = _random_of(dtype, nbytes, g)
            if dtype.is_floating_point or dtype.is_complex:
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
            else:
                self.register_buffer(name, t)


TensorFacts = tuple[str, tuple[int, ...], tuple[int, ...], int, np.ndarray]


def _describe_tensors(model: nn.Module) -> dict[str, TensorFacts]:
    """Per tensor name: dtype, shape, stride, storage offset and element bytes."""
    return {
        name: (str(t.dtype), tuple(t.shape), tuple(t.stride()), t.storage_offset(), _raw_bytes(t))
        for name, t in probes.named_tensors(model)
    }


def compare_tensors(expected: nn.Module, got: dict[str, TensorFacts]) -> None:
    """Assert every tensor of ``expected`` has the same dtype, shape, strides and bytes as in ``got``."""
    want = _describe_tensors(expected)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, f"tensor names differ after load: missing {missing}, extra {extra}"
    fields = ("dtype", "shape", "stride", "storage_offset")
    for name, facts in want.items():
        for field, w, g in zip(fields, facts, got[name]):
            assert g == w, f"{name}: {field} {g} after load, {w} in the original"
        data, g_data = facts[-1], got[name][-1]
        if not np.array_equal(g_data, data):
            diff = np.flatnonzero(g_data != data)
            raise AssertionError(
                f"{name} ({facts[0]}): {diff.size} of {data.size} bytes differ, first at byte {diff[0]} "
                f"({g_data[diff[0]]:#04x} after load vs {data[diff[0]]:#04x})"
            )


@check("fidelity.dtypes", hosts={"head": 1})
def check_dtypes(impl) -> dict[str, Any]:
    """bf16, fp16, both float8s, bool, int8/32/64, uint8 and complex64 tensors keep dtype, shape and bytes."""
    original = AllDtypes()
    with hosts.loaded(impl, original) as (actor,):
        got = ray.get(actor.apply(_describe_tensors))
    compare_tensors(original, got)
    return {"dtypes": [str(d) for d in DTYPES], "bytes_each": TENSOR_BYTES}


@check("fidelity.random_tensors", hosts={"head": 1})
def check_random_tensors(impl) -> dict[str, Any]:
    """Hypothesis-drawn tensors (odd dtypes, strides, offsets, views) keep dtype, layout and bytes."""
    from hypothesis import given

    from .. import strategies  # lazily: hypothesis is only needed by this check

    drawn: list[int] = []

    def one(module: nn.Module) -> None:
        with hosts.loaded(impl, module) as (actor,):
            got = ray.get(actor.apply(_describe_tensors))
        compare_tensors(module, got)
        drawn.append(len(list(probes.named_tensors(module))))

    tensors = strategies.fidelity_tensors(min_bytes=strategies.MIN_STORAGE_BYTES, as_module=True)
    strategies.load_profile()(given(tensors)(one))()
    return {"examples": len(drawn), "tensors_per_example": drawn}


# ---------------------------------------------------------------- tied weights


class Tied(nn.Module):
    """An encoder/decoder pair sharing one 1 MiB weight, plus an untied bias."""

    def __init__(self, dim: int = 512):
        super().__init__()
        torch.manual_seed(4)
        self.a = nn.Linear(dim, dim, bias=False)
        self.b = nn.Linear(dim, dim)
        self.b.weight = self.a.weight


def _tie_report(model: Tied) -> dict[str, Any]:
    return {
        "same_object": model.a.weight is model.b.weight,
        "same_storage": model.a.weight.untyped_storage().data_ptr() == model.b.weight.untyped_storage().data_ptr(),
        "bytes": _raw_bytes(model.a.weight),
    }


@check("fidelity.tied_weights", hosts={"head": 1})
def check_tied_weights(impl) -> dict[str, Any]:
    """A weight tied between two modules stays one Parameter over one storage, stored once."""
    original = Tied()
    nbytes = original.a.weight.nbytes
    before = probes.store_bytes()
    with hosts.loaded(impl, original) as (actor,):
        grown = probes.store_bytes() - before  # before apply: its reply lands in the store too
        report = ray.get(actor.apply(_tie_report))
    assert report["same_object"], "a.weight and b.weight are two objects after load (tied in the original)"
    assert report["same_storage"], "a.weight and b.weight have separate storages after load (tied in the original)"
    assert np.array_equal(report["bytes"], _raw_bytes(original.a.weight)), "tied weight a.weight: bytes differ"
    # Only where the implementation uses the store at all: a tied weight must not be stored twice.
    assert grown < 1.5 * nbytes + 256 * 1024, (
        f"object store grew by {grown / 2**20:.2f} MiB for a {nbytes / 2**20:.2f} MiB tied weight: stored twice"
    )
    return {"tied_bytes": nbytes, "store_growth_bytes": grown}


# ---------------------------------------------------------------- layout


class Layouts(nn.Module):
    """Weights whose layout is not plain contiguous, each over 100 KiB."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.transposed = nn.Parameter(torch.randn(256, 192).t())  # stride (1, 192)
        base = torch.randn(80_000)
        self.sliced = nn.Parameter(base[1000 : 1000 + 300 * 200].view(300, 200))  # storage offset 1000
        self.conv = nn.Conv2d(64, 64, 3, padding=1).to(memory_format=torch.channels_last)
        pair = torch.randn(2, 192, 192)
        self.first = nn.Parameter(pair[0])  # first and second: two views of one storage
        self.second = nn.Parameter(pair[1])


def _layout_inputs() -> torch.Tensor:
    x = torch.randn(2, 64, 10, 10, generator=torch.Generator().manual_seed(6))
    return x.to(memory_format=torch.channels_last)


def _layout_report(model: nn.Module) -> dict[str, Any]:
    tensors = dict(probes.named_tensors(model))
    ptrs = {n: t.untyped_storage().data_ptr() for n, t in tensors.items()}
    groups = sorted(sorted(n for n in tensors if ptrs[n] == p) for p in set(ptrs.values()))
    with torch.no_grad():
        conv_out = model.conv(_layout_inputs())
    return {
        "layout": {
            n: {
                "shape": tuple(t.shape),
                "stride": t.stride(),
                "storage_offset": t.storage_offset(),
                "contiguous": t.is_contiguous(),
                "channels_last": t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last),
            }
            for n, t in tensors.items()
        },
        "storage_groups": [g for g in groups if len(g) > 1],
        "conv_out": conv_out,
        "bytes": {n: _raw_bytes(t) for n, t in tensors.items()},
    }


@check("fidelity.layout", hosts={"head": 1})
def check_layout(impl) -> dict[str, Any]:
    """Strides, storage offsets, channels_last and views sharing a storage survive; conv outputs equal."""
    original = Layouts()
    want = _layout_report(original)
    with hosts.loaded(impl, original) as (actor,):
        got = ray.get(actor.apply(_layout_report))
    for name, w in want["layout"].items():
        g = got["layout"].get(name)
        assert g is not None, f"{name}: missing after load"
        for key, value in w.items():
            assert g[key] == value, f"{name}: {key} {g[key]} after load, {value} in the original"
        assert np.array_equal(got["bytes"][name], want["bytes"][name]), f"{name}: bytes differ after load"
    assert got["storage_groups"] == want["storage_groups"], (
        f"tensors sharing a storage: {got['storage_groups']} after load, {want['storage_groups']} in the original"
    )
    if not torch.equal(got["conv_out"], want["conv_out"]):
        diff = (got["conv_out"] - want["conv_out"]).abs()
        raise AssertionError(f"conv output differs: max abs diff {diff.max().item():.3g}, {int((diff > 0).sum())} elements")
    return {"tensors": len(want["layout"]), "shared_groups": want["storage_groups"]}


# ---------------------------------------------------------------- metadata


class Metadata(nn.Module):
    """Parameters (one frozen), persistent and non-persistent buffers, one submodule in train mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.encoder = nn.Linear(256, 256)
        self.frozen = nn.Linear(256, 256)
        self.frozen.weight.requires_grad_(False)
        self.dropout_block = nn.Sequential(nn.Linear(256, 128), nn.Dropout(0.1))
        self.register_buffer("table", torch.randn(128, 256))
        self.register_buffer("cache", torch.randn(128, 256), persistent=False)
        self.eval()
        self.dropout_block.train()  # mixed modes must survive as they are


def _metadata_report(model: nn.Module) -> dict[str, Any]:
    return {
        "parameters": [(n, type(p).__name__, p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, type(b).__name__) for n, b in model.named_buffers()],
        "state_dict": list(model.state_dict().keys()),
        "training": [(n or "<root>", m.training) for n, m in model.named_modules()],
    }


@check("fidelity.metadata", hosts={"head": 1})
def check_metadata(impl) -> dict[str, Any]:
    """Parameters stay Parameters, buffers stay (non-)persistent buffers, requires_grad and train/eval per module survive."""
    original = Metadata()
    want = _metadata_report(original)
    with hosts.loaded(impl, original) as (actor,):
        got = ray.get(actor.apply(_metadata_report))
    for key in ("parameters", "buffers", "state_dict", "training"):
        w, g = want[key], got[key]
        if w != g:
            diff = [x for x in w if x not in g] + [x for x in g if x not in w]
            raise AssertionError(f"{key} differ after load: original-only/loaded-only entries {diff}")
    return {key: len(value) for key, value in want.items()}


# ---------------------------------------------------------------- autograd


class Small(nn.Module):
    """A two-layer MLP whose weights are each 256 KiB."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.net = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _input_grad(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    inference = [n for n, t in probes.named_tensors(model) if t.is_inference()]
    x = x.clone().requires_grad_()
    try:
        model(x).sum().backward()
    except RuntimeError as exc:
        return {"inference": inference, "error": str(exc).splitlines()[0], "grad": None}
    return {"inference": inference, "error": None, "grad": x.grad}


@check("fidelity.autograd", hosts={"head": 1})
def check_autograd(impl) -> dict[str, Any]:
    """Gradients with respect to the inputs flow through the loaded model and equal the original's."""
    original = Small().eval()
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(9))
    want = _input_grad(original, x)
    with hosts.loaded(impl, original) as (actor,):
        got = ray.get(actor.apply(_input_grad, x))
    assert not got["inference"], f"inference tensors after load (autograd cannot use them): {got['inference']}"
    assert got["error"] is None, f"backward through the loaded model failed: {got['error']}"
    if not torch.equal(got["grad"], want["grad"]):
        diff = (got["grad"] - want["grad"]).abs()
        raise AssertionError(f"input gradient differs: max abs diff {diff.max().item():.3g}, {int((diff > 0).sum())} elements")
    return {"grad_norm": float(want["grad"].norm())}
