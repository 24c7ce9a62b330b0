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


def _forward_uss(model: torch.nn.Module, inputs: tuple) -> dict[str, int]:
    """USS before and after one forward pass, after a warm-up on a throw-away layer.

    The warm-up pays torch's one-time kernel and thread-pool allocations, so what is
    left is what touching the weights costs.
    """
    with torch.no_grad():
        torch.nn.Linear(inputs[0].shape[-1], 8)(inputs[0])
        before = probes.memory().uss
        model(*inputs)
        after = probes.memory().uss
    return {"before": before, "after": after}


@check("zero_copy.second_actor_private_memory", requires=("cpu", "zero_copy"), hosts={"head": 2})
def check_second_actor_private_memory(impl) -> dict[str, Any]:
    """Each of two actors gains at most max(8 MiB, 10% of the model) of private memory by loading and running it."""
    case = models.blob_case(64)
    original = models.build(case)
    nbytes = probes.model_bytes(original)
    bound = max(8 * MiB, nbytes // 10)
    wrapped = impl.wrap(original, "actor")
    seen: dict[str, list] = {"load_uss_growth": [], "forward_uss_growth": [], "load_s": []}
    pool: list[hosts.Loaded] = []
    try:
        for i in (1, 2):  # one after the other: the second must reuse the pages the first mapped
            (actor,) = hosts.load(impl, wrapped)
            pool.append(actor)
            report = actor.report
            fwd = ray.get(actor.apply(_forward_uss, case.inputs()))
            grown, touched = report["after"]["uss"] - report["before"]["uss"], fwd["after"] - fwd["before"]
            seen["load_uss_growth"].append(grown)
            seen["forward_uss_growth"].append(touched)
            seen["load_s"].append(report["load_s"])
            assert grown <= bound, (
                f"actor {i} gained {grown / MiB:.1f} MiB USS loading a {nbytes / MiB:.1f} MiB model "
                f"(bound {bound / MiB:.1f} MiB): it holds a private copy"
            )
            assert grown + touched <= bound, (
                f"actor {i} gained {(grown + touched) / MiB:.1f} MiB USS after one forward pass over a "
                f"{nbytes / MiB:.1f} MiB model (load {grown / MiB:.1f} + forward {touched / MiB:.1f}; "
                f"bound {bound / MiB:.1f} MiB)"
            )
    finally:
        hosts.release(pool)
        release(impl, wrapped)
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
