"""One Ray cluster for a whole check run (starting Ray costs seconds)."""

from __future__ import annotations

import os
from typing import Any

import ray

#: Store size of the private cluster (per node when nodes are simulated).
STORE_BYTES = 2 * 2**30


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
            object_store_memory=STORE_BYTES,
            include_dashboard=False,
            logging_level="ERROR",
            log_to_driver=False,
        )


def start_simulated_cluster(
    nodes: int,
    *,
    num_cpus: int = 4,
    store_bytes: int = STORE_BYTES,
    resources: list[dict[str, float]] | None = None,
) -> Any:
    """Start ``nodes`` Ray nodes on this host, each with its own object store, and connect to the head.

    A simulation (``ray.cluster_utils.Cluster``): the nodes share the host's memory, but
    objects move between their stores as between real nodes. ``resources[i]`` adds
    custom resources to node ``i`` (to pin actors to it). Returns the cluster; call
    ``ray.shutdown()`` and then its ``shutdown()``.
    """
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    extra = resources or [{} for _ in range(nodes)]
    if nodes < 1 or len(extra) != nodes:
        raise ValueError(f"need at least one node and one resource dict per node, got {nodes} nodes and {len(extra)} dicts")
    args = [{"num_cpus": num_cpus, "object_store_memory": store_bytes, "resources": r} for r in extra]
    cluster = Cluster(initialize_head=True, head_node_args=args[0])
    try:
        for a in args[1:]:
            cluster.add_node(**a)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    except BaseException:
        cluster.shutdown()
        raise
    return cluster
