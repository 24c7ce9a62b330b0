"""Zero-copy: loaded weights are the object store's pages, not private copies.

Evidence is physical and read independently of the implementation: where each
storage's bytes lie (``/proc/self/maps`` of the actor), how much private memory (USS)
an actor gains by loading, and how many bytes the node's object store holds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray
import torch

from .. import actors, probes
from ..cases import MIXED, blob_case
from ..contract import release
from ..registry import check

MiB = 2**20
#: Ray inlines objects below ~100 KiB; only larger storages can prove zero-copy.
MIN_STORAGE_BYTES = 100 * 1024


@contextlib.contextmanager
def loaded(impl, obj: Any, count: int = 1) -> Iterator[list[Any]]:
    """Wrap ``obj`` with ``impl`` and yield ``count`` actors that loaded it; clean up after."""
    wrapped = impl.wrap(obj, "actor")
    pool: list[Any] = []
    try:
        pool = actors.spawn(impl, wrapped, count)
        yield pool
    finally:
        actors.kill(pool)
        wait_dead(pool)
        release(impl, wrapped)


def wait_dead(pool: list[Any], timeout_s: float = 15.0) -> None:
    """Wait until killed actors are gone, so the objects they held are freed before the next measurement."""
    for a in pool:
        try:
            ray.get(a.pid.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the distinct storages of ``model`` (tied weights and views counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for _, t in probes.named_tensors(model)}
    return sum(storages.values())


@check("zero_copy.bytes_in_store", requires=("cpu", "zero_copy"))
def check_bytes_in_store(impl) -> dict[str, Any]:
    """Every parameter and buffer storage over 100 KiB lies inside the actor's object store mapping."""
    with loaded(impl, MIXED.build()) as (actor,):
        res = ray.get(actor.residency.remote(MIN_STORAGE_BYTES))
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


@check("zero_copy.second_actor_private_memory", requires=("cpu", "zero_copy"))
def check_second_actor_private_memory(impl) -> dict[str, Any]:
    """Each of two actors gains at most max(8 MiB, 10% of the model) of private memory by loading and running it."""
    case = blob_case(64)
    original = case.build()
    nbytes = model_bytes(original)
    bound = max(8 * MiB, nbytes // 10)
    wrapped = impl.wrap(original, "actor")
    pool: list[Any] = []
    seen: dict[str, list] = {"load_uss_growth": [], "forward_uss_growth": [], "load_s": []}
    try:
        for i in (1, 2):  # one after the other: the second must reuse the pages the first mapped
            (actor,) = actors.spawn(impl, wrapped, 1)
            pool.append(actor)
            report = ray.get(actor.load_report.remote())
            fwd = ray.get(actor.apply.remote(_forward_uss, case.inputs()))
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
        actors.kill(pool)
        wait_dead(pool)
        release(impl, wrapped)
    return {"model_bytes": nbytes, "bound_bytes": bound, **seen}


@check("zero_copy.store_holds_one_copy", requires=("cpu", "zero_copy"))
def check_store_holds_one_copy(impl) -> dict[str, Any]:
    """Wrapping once and loading in three actors adds at most 1.25x the model's bytes to the object store."""
    original = blob_case(32).build()
    nbytes = model_bytes(original)
    slack = 4 * MiB
    before = probes.settled_store_bytes()
    with loaded(impl, original, count=3):
        grown = probes.settled_store_bytes() - before
    assert grown <= 1.25 * nbytes + slack, (
        f"object store grew by {grown / MiB:.1f} MiB ({grown / nbytes:.2f}x) for a {nbytes / MiB:.1f} MiB model "
        f"loaded by 3 actors (bound 1.25x + {slack // MiB} MiB)"
    )
    return {"model_bytes": nbytes, "store_growth_bytes": grown, "ratio": grown / nbytes}
