"""Scale: thousands of tensors, a pool of 16 actors, and a model larger than the object store.

These guard against pathologies (a descriptor or mapping per tensor, quadratic loading,
per-actor copies, silent corruption near capacity); benchmarks belong to the harness.
"""

from __future__ import annotations

import os
from typing import Any

import ray
import torch
from torch import nn

from .. import actors, probes
from ..cases import blob_case
from ..compare import assert_same
from ..contract import release
from ..registry import SkipCheck, check
from .multi_node import run_probe

MiB = 2**20
PARAM_ELEMS = 1024  # 4 KiB of float32 per parameter


class ManyTensors(nn.Module):
    """``count`` small parameters; the output depends on every byte of every one."""

    def __init__(self, count: int):
        super().__init__()
        g = torch.Generator().manual_seed(count)
        self.params = nn.ParameterList(nn.Parameter(torch.randn(PARAM_ELEMS, generator=g)) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([(p * x).sum() for p in self.params])


def _many_inputs() -> tuple:
    return (torch.randn(PARAM_ELEMS, generator=torch.Generator().manual_seed(7)),)


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def _descriptors(_model) -> dict[str, int]:
    """Open file descriptors and memory mappings of this process."""
    with open("/proc/self/maps") as maps:
        mappings = sum(1 for _ in maps)
    return {"fds": len(os.listdir("/proc/self/fd")), "mappings": mappings}


def _load_many(impl, count: int) -> dict[str, Any]:
    """Load a ``count``-parameter model in one actor: load time, descriptors, exact outputs."""
    original = ManyTensors(count).eval()
    inputs = _many_inputs()
    expected = _run(original, inputs)
    wrapped = impl.wrap(original, "actor")
    pool = actors.spawn(impl, wrapped, 1)
    try:
        report, got, handles = ray.get(
            [pool[0].load_report.remote(), pool[0].apply.remote(_run, inputs), pool[0].apply.remote(_descriptors)]
        )
    finally:
        actors.kill(pool)
        release(impl, wrapped)
    assert_same(got, expected, f"{count}-tensor model output")
    return {"load_s": report["load_s"], **handles}


def judge_many(small: dict[str, Any], mid: dict[str, Any], big: dict[str, Any], counts=(50, 500, 5000)) -> None:
    """Descriptors and mappings must not grow per tensor; load time must not grow quadratically."""
    per_tensor_floor = 0.1 * (counts[2] - counts[0])
    for what in ("fds", "mappings"):
        grown = big[what] - small[what]
        assert grown < per_tensor_floor, (
            f"scale: loading {counts[2]} tensors opened {grown} more {what} than {counts[0]} tensors (one per tensor?)"
        )
    assert big["fds"] < 1024, f"scale: {big['fds']} open descriptors after loading {counts[2]} tensors (limit 1024)"
    limit = 30 * mid["load_s"] + 2.0
    assert big["load_s"] < limit, (
        f"scale: load of {counts[2]} tensors took {big['load_s']:.2f} s vs {mid['load_s']:.2f} s for {counts[1]} "
        f"(> 30x + 2 s: worse than quadratic-safe)"
    )


@check("scale.many_tensors", slow=True)
def check_many_tensors(impl) -> dict[str, Any]:
    """A model of 5,000 4-KiB parameters loads with exact outputs, no per-tensor descriptors, sub-quadratic time."""
    runs = {n: _load_many(impl, n) for n in (50, 500, 5000)}
    judge_many(runs[50], runs[500], runs[5000])
    return {f"n{n}": r for n, r in runs.items()}


def _touch(model) -> dict[str, int]:
    """Read every weight byte (so lazily mapped pages are really mapped), then measure memory."""
    with torch.no_grad():
        for _, t in probes.named_tensors(model):
            t.sum()
    return probes.memory().as_dict()


@check("scale.pool_16_actors", slow=True)
def check_pool_16_actors(impl) -> dict[str, Any]:
    """16 actors load a 64 MiB model; no actor's private memory (USS) grows by more than max(8 MiB, 10%)."""
    if not impl.capabilities.zero_copy:
        raise SkipCheck("implementation does not claim zero-copy")
    case = blob_case(64)
    original = case.build()
    model_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
    bound = max(8 * MiB, model_bytes // 10)
    wrapped = impl.wrap(original, "actor")
    pool = actors.spawn(impl, wrapped, 16, num_cpus=0.01)
    try:
        reports = ray.get([a.load_report.remote() for a in pool])
        touched = ray.get([a.apply.remote(_touch) for a in pool])
    finally:
        actors.kill(pool)
        release(impl, wrapped)
    growth = [t["uss"] - r["before"]["uss"] for r, t in zip(reports, touched)]
    worst = max(range(len(growth)), key=growth.__getitem__)
    assert growth[worst] <= bound, (
        f"scale: actor {worst} of 16 grew its private memory (USS) by {growth[worst] / MiB:.1f} MiB loading a "
        f"{model_bytes / MiB:.0f} MiB model (bound {bound / MiB:.1f} MiB)"
    )
    return {"model_bytes": model_bytes, "max_uss_growth": growth[worst], "median_uss_growth": sorted(growth)[8]}


def judge_near_capacity(report: dict[str, Any], zero_copy: bool) -> dict[str, Any]:
    """Refusing to wrap is fine; wrapping is fine only if every actor then computes the exact outputs."""
    observed = {k: report.get(k) for k in ("model_bytes", "store_capacity", "wrap_raised", "load_raised", "store_paths")}
    if report["wrap_raised"]:
        # A refusal before any actor started is right, if it says why: the store is too small.
        assert "store" in report["wrap_raised"].lower(), (
            f"scale: wrap refused a model over store capacity without naming the object store: {report['wrap_raised']}"
        )
        return observed
    assert not report["load_raised"], f"scale: wrap accepted a model over store capacity, then loading failed: {report['load_raised']}"
    bad = [i for i, same in enumerate(report["outputs_identical"]) if not same]
    assert not bad, f"scale: wrap accepted a model over store capacity and actors {bad} compute wrong outputs"
    if zero_copy:
        for i, r in enumerate(report["residency"]):
            assert r["bytes_in_store"] == r["bytes_total"], (
                f"scale: over capacity, actor {i} holds {r['bytes_total'] - r['bytes_in_store']} weight bytes outside the store"
            )
    return observed


@check("scale.near_capacity", slow=True)
def check_near_capacity(impl) -> dict[str, Any]:
    """A 192 MiB model with a 128 MiB object store: wrap refuses clearly, or actors still compute exact outputs."""
    report = run_probe(impl, "near_capacity", model_mib=192, store_mib=128, timeout_s=180)
    return judge_near_capacity(report, impl.capabilities.zero_copy)
