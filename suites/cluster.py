"""One Ray cluster for a whole check run (starting Ray costs seconds)."""

from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None, num_cpus: int = 8) -> None:
    """Connect to ``address`` or start a private local cluster, once per process.

    More logical CPUs than cores: probe actors ask for tiny CPU fractions anyway, and
    Ray Data's read tasks must never starve behind an actor pool.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            object_store_memory=2 * 2**30,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )
