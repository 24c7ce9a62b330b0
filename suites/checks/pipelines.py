"""Pipelines: plain Python objects holding modules load with their structure and sharing intact.

The pipeline classes live at module level so they pickle by reference and workers can
import them.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from torch import nn

from .. import hosts, probes
from ..contract import Implementation, release
from ..equality import assert_same
from ..registry import check

MiB = 2**20


class Inner:
    """A plain object nested inside a pipeline, holding a module of its own."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.label = "inner"


class ContainerPipeline:
    """Modules in an attribute, a list, a tuple, a dict and a nested plain object.

    ``shared`` (4 MiB, the largest) is referenced twice: as an attribute and in ``heads``.
    """

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.shared = nn.Linear(1024, 1024)
        self.stages = [nn.Linear(1024, 256), nn.Linear(256, 256)]
        self.pair = (nn.Linear(256, 256), nn.LayerNorm(256))
        self.heads = {"shared": self.shared, "out": nn.Linear(256, 256)}
        self.inner = Inner(nn.Linear(256, 256))
        self.scale = 0.5

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        a = self.shared(x)
        b = self.heads["shared"](a)
        h = self.stages[1](torch.relu(self.stages[0](b)))
        h = self.pair[1](self.pair[0](h))
        return {"a": a, "b": b, "out": self.inner.module(self.heads["out"](h)) * self.scale}


class Codec:
    """A pipeline whose use is through extra public methods, not ``__call__``."""

    def __init__(self) -> None:
        torch.manual_seed(1)
        self.encoder = nn.Sequential(nn.Linear(512, 256), nn.Tanh())
        self.decoder = nn.Linear(256, 512)
        self.vocab = {"<unk>": 0, "zero": 1, "copy": 2}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def roundtrip(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def token_ids(self, words: list[str]) -> list[int]:
        return [self.vocab.get(w, 0) for w in words]


def _run_containers(p: Any, x: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        out = p(x)
    return {
        "out": out,
        "types": [type(p).__name__, type(p.stages).__name__, type(p.pair).__name__, type(p.heads).__name__, type(p.inner).__name__],
        "scale": p.scale,
        "same_object": p.shared is p.heads["shared"],
        "same_ptr": p.shared.weight.data_ptr() == p.heads["shared"].weight.data_ptr(),
        "residency": probes.residency(p, min_bytes=100 * 1024).as_dict(),
    }


@check("pipelines.containers", requires=("cpu", "pipelines"), hosts={"head": 1})
def check_containers(impl: Implementation) -> dict:
    """A pipeline with modules in attributes/list/tuple/dict/nested object loads identical, a twice-referenced module stays one object stored once."""
    original = ContainerPipeline()
    x = torch.randn(4, 1024, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = original(x)
    unique = probes.model_bytes(original)
    shared = probes.model_bytes(original.shared)
    before = probes.store_bytes()
    wrapped = impl.wrap(original, "actor")
    pool: list[hosts.Loaded] = []
    try:
        pool = hosts.load(impl, wrapped)
        added = probes.store_bytes() - before
        got = ray.get(pool[0].apply(_run_containers, x))
    finally:
        hosts.release(pool)
        release(impl, wrapped)
    assert_same(got["out"], expected)
    want_types = ["ContainerPipeline", "list", "tuple", "dict", "Inner"]
    assert got["types"] == want_types, f"container types changed on load: {got['types']} instead of {want_types}"
    assert got["scale"] == original.scale, f"plain attribute scale is {got['scale']!r} after load, not {original.scale!r}"
    assert got["same_object"], "pipeline.shared and pipeline.heads['shared'] are one module in the original but two objects after load"
    assert got["same_ptr"], "pipeline.shared.weight and pipeline.heads['shared'].weight point at different bytes after load"
    if impl.capabilities.zero_copy:
        frac = got["residency"]["fraction_in_store"]
        assert frac == 1.0, f"only {frac:.0%} of the pipeline's bytes lie in the object store; outside: {got['residency']['outside'][:5]}"
        # Stored twice would add unique + shared bytes; once adds unique (plus small overhead).
        assert added < unique + shared // 2, (
            f"wrapping added {added / MiB:.1f} MiB to the store for {unique / MiB:.1f} MiB of unique weights: "
            f"the twice-referenced {shared / MiB:.0f} MiB module seems stored twice"
        )
    return {"unique_mib": unique / MiB, "store_added_mib": added / MiB}


def _run_codec(p: Any, x: torch.Tensor, words: list[str]) -> dict[str, Any]:
    with torch.no_grad():
        z = p.encode(x)
        return {"encode": z, "decode": p.decode(z), "roundtrip": p.roundtrip(x), "token_ids": p.token_ids(words)}


@check("pipelines.methods", requires=("cpu", "pipelines"), hosts={"head": 1})
def check_methods(impl: Implementation) -> None:
    """A pipeline's own public methods (encode/decode/roundtrip/token_ids) work after load, with identical results."""
    original = Codec()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(3))
    words = ["copy", "zero", "nothing"]
    expected = _run_codec(original, x, words)
    with hosts.loaded(impl, original) as (actor,):
        got = ray.get(actor.apply(_run_codec, x, words))
    assert_same(got, expected, "pipeline methods")
