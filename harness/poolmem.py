"""What a pool of actors costs in memory, every shared page counted once, the same formula for every implementation.

For a pool of N actors (:func:`zcbench.suites.probes.pool_total` over their memory splits):

    pool total   = Σ private memory of the actors (anonymous pages, copy-on-write copies)
                   + every file they map (the object store's shared-memory file, a checkpoint that
                   torch.load(mmap=True) or safetensors maps, shared libraries), its resident pages once
    pool empty   = the same over the same actors just before their load (each actor's own runtime:
                   Python, torch, Ray; the shared libraries once)
    model cost   = pool total - pool empty          (what the model costs on top of N empty actors)
    model copies = model cost / model bytes         (1: one copy for the pool; N: one per actor)

The readings are the pool actors' own (:mod:`zcbench.suites.pipeline`): before the load and
after a forward pass, while every actor of the pool holds the model. Counting a file's pages
by its resident pages (not by whether another process maps them at that instant) makes the
total the same whatever order Ray Data retires the actors in. Never a sum of RSS.
"""

from __future__ import annotations

from typing import Any

from zcbench.suites import probes


def pool_memory(empty: list[dict[str, Any]], end: list[dict[str, Any]], model_bytes: int) -> dict[str, float]:
    """The pool metrics from each actor's memory split (``probes.memory_split``) before any weight and after inference."""
    total = probes.pool_total(end)
    private = sum(s["private"] for s in end)
    empty_total = probes.pool_total(empty)
    cost = total - empty_total
    return {
        "pool_private_bytes": private,
        "pool_shared_bytes": total - private,
        "pool_total_bytes": total,
        "pool_empty_bytes": empty_total,
        "model_cost_bytes": cost,
        "model_copies": cost / model_bytes if model_bytes else float("nan"),
    }
