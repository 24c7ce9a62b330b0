"""Zero-copy: loaded weights are the object store's pages, not private copies.

Evidence is physical and read independently of the implementation: where each
storage's bytes lie (``/proc/self/maps`` of the actor), how much private memory (USS)
an actor gains by loading, and how many bytes the node's object store holds.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from .. import hosts, models, probes
from ..contract import release
from ..registry import check

MiB = 2**20
#: Ray inlines objects below ~100 KiB; only larger storages can prove zero-copy.
MIN_STORAGE_BYTES = 100 * 1024
#: The store must gain the model's unique bytes once: between these factors of them.
ONE_COPY = (0.95, 1.05)


@check("zero_copy.bytes_in_store", requires=("cpu", "zero_copy"), hosts={"head": 1})
def check_bytes_in_store(impl) -> dict[str, Any]:
    """Every parameter and buffer storage over 100 KiB lies inside the actor's shared-memory object store mapping."""
    with hosts.loaded(impl, models.build(models.MIXED)) as (actor,):
        res = ray.get(actor.residency(MIN_STORAGE_BYTES))
    assert res["bytes_total"] > 0, "no storage over 100 KiB found in the loaded model"
    assert not res["outside"], (
        f"{res['fraction_in_store']:.1%} of {res['bytes_total'] / MiB:.1f} MiB lies in the object store; "
        f"outside it: {', '.join(sorted(set(res['outside'])))}"
    )
    return res


def _warm_uss(model: torch.nn.Module, inputs: tuple) -> dict[str, int]:
    """USS now, and after a warm-up forward pass of a throw-away layer.

    The warm-up pays torch's one-time kernel and thread-pool allocations, so what a forward
    pass of ``model`` adds after it is what touching the weights costs.
    """
    loaded = probes.memory().uss
    with torch.no_grad():
        torch.nn.Linear(inputs[0].shape[-1], 8)(inputs[0])
    return {"loaded": loaded, "warm": probes.memory().uss}


def _forward(model: torch.nn.Module, inputs: tuple) -> None:
    with torch.no_grad():
        model(*inputs)


@check("zero_copy.second_actor_private_memory", requires=("cpu", "zero_copy"), hosts={"head": 2})
def check_second_actor_private_memory(impl) -> dict[str, Any]:
    """Each of two actors gains at most max(8 MiB, 10% of the model) of private memory by loading and running it.

    The actors load one after the other (the second must reuse the pages the first mapped), and
    each one's memory is read only once both have loaded, then once both have run a forward
    pass: until a second process maps a page of a shared file, it counts in the USS of the
    first, though nothing was copied.
    """
    case = models.blob_case(64)
    original = models.build(case)
    nbytes = probes.model_bytes(original)
    bound = max(8 * MiB, nbytes // 10)
    wrapped = impl.wrap(original, "actor")
    inputs = case.inputs()
    pool: list[hosts.Loaded] = []
    try:
        for _ in (1, 2):
            pool += hosts.load(impl, wrapped)
        warm = ray.get([a.apply(_warm_uss, inputs) for a in pool])
        ray.get([a.apply(_forward, inputs) for a in pool])
        ran = [m["uss"] for m in ray.get([a.memory() for a in pool])]
    finally:
        hosts.release(pool)
        release(impl, wrapped)
    seen = {
        "load_uss_growth": [w["loaded"] - a.report["before"]["uss"] for a, w in zip(pool, warm)],
        "forward_uss_growth": [r - w["warm"] for r, w in zip(ran, warm)],
        "load_s": [a.report["load_s"] for a in pool],
    }
    for i, (grown, touched) in enumerate(zip(seen["load_uss_growth"], seen["forward_uss_growth"]), 1):
        assert grown <= bound, (
            f"actor {i} gained {grown / MiB:.1f} MiB USS loading a {nbytes / MiB:.1f} MiB model "
            f"(bound {bound / MiB:.1f} MiB): it holds a private copy"
        )
        assert grown + touched <= bound, (
            f"actor {i} gained {(grown + touched) / MiB:.1f} MiB USS after one forward pass over a "
            f"{nbytes / MiB:.1f} MiB model (load {grown / MiB:.1f} + forward {touched / MiB:.1f}; "
            f"bound {bound / MiB:.1f} MiB)"
        )
    return {"model_bytes": nbytes, "bound_bytes": bound, **seen}


@check("zero_copy.store_holds_one_copy", requires=("cpu", "zero_copy"), hosts={"head": 3})
def check_store_holds_one_copy(impl) -> dict[str, Any]:
    """Wrapping once and loading in three actors adds between 0.95x and 1.05x the model's unique bytes to the object store."""
    original = models.build(models.blob_case(32))
    nbytes = probes.model_bytes(original)
    before = probes.store_bytes()
    wrapped = impl.wrap(original, "actor")
    pool: list[hosts.Loaded] = []
    try:
        pool = hosts.load(impl, wrapped, 3)
        grown = probes.store_bytes() - before
    finally:
        hosts.release(pool)
        release(impl, wrapped)
    lo, hi = ONE_COPY
    ratio = grown / nbytes
    assert ratio >= lo, (
        f"object store grew by {grown / MiB:.1f} MiB ({ratio:.2f}x) for a {nbytes / MiB:.1f} MiB model loaded by "
        f"3 actors: the weights are not in the store (a zero-copy share holds them once: {lo}-{hi}x)"
    )
    assert ratio <= hi, (
        f"object store grew by {grown / MiB:.1f} MiB ({ratio:.2f}x) for a {nbytes / MiB:.1f} MiB model loaded by "
        f"3 actors: more than one copy (bound {lo}-{hi}x)"
    )
    return {"model_bytes": nbytes, "store_growth_bytes": grown, "ratio": ratio}
