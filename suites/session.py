"""The Ray cluster a conformance run uses: started once, restarted only after an infrastructure error.

A private session is three simulated nodes on this host (``ray.cluster_utils.Cluster``),
each with its own object store: the driver's node, a second node (for the multi-node
check) and a node whose store is deliberately small (for the over-capacity check).
Probe actors are pinned to the node their check names, so a store reading on the
driver's node is never disturbed by another node's work. An existing cluster
(``address``) is used as it is; a role it has no node for is ``None`` and the checks
that need it are skipped with that reason.
"""

from __future__ import annotations

import atexit
import gc
import os
import time
from dataclasses import dataclass
from typing import Any

import ray

from .errors import InfrastructureError

MiB = 2**20
#: Node roles: the driver's node, another node of the same cluster, a node with a small store.
HEAD, SECOND, SMALL = "head", "second", "small"
#: A custom resource that names each node's role, so actors can be pinned to it.
ROLE_RESOURCE = "zcbench_node_{}"
START_ATTEMPTS = 3
#: Ray settings of a private cluster that change when things happen, never what happens:
#: - raylets batch the deletion of freed objects and flush once a second, and every check's
#:   clean-up waits for the store to come back: it would wait up to that second each time;
#: - a node keeps only as many idle workers as it has CPUs, counting the probe actors: every
#:   Ray Data read or write and every task-mode call would start fresh worker processes
#:   (seconds of CPU each, importing pyarrow or torch) instead of reusing idle ones;
#: - a store that is full of objects no one can spill (mapped by a process) waits two seconds
#:   before it puts a new object in the disk-backed fallback: every fill past capacity (the
#:   lifetime checks) would wait that long. Ray still spills what it can and reuses every freed
#:   page first; only the wait for a garbage collection that could free more is skipped.
SYSTEM_CONFIG = {"free_objects_period_milliseconds": 20, "num_workers_soft_limit": 1000, "oom_grace_period_s": 0}


@dataclass(frozen=True)
class NodeSpec:
    """One simulated node: logical CPUs (probe actors ask for tiny fractions), object store bytes, and
    GPUs (``None``: the ones this machine has; only one node of a layout should claim them)."""

    cpus: int
    store_bytes: int
    gpus: int | None = 0


def visible_gpus() -> int:
    """CUDA devices torch sees here (0 without CUDA)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU for the session
        return 0


#: The conformance layout. The head's store holds every check's model at once and is small enough
#: that filling it past capacity (lifetime.store_pressure) is quick; the small node's store is
#: smaller than the over-capacity check's model.
CONFORMANCE_LAYOUT: dict[str, NodeSpec] = {
    HEAD: NodeSpec(2, 512 * MiB, gpus=None),
    SECOND: NodeSpec(2, 256 * MiB),
    SMALL: NodeSpec(2, 128 * MiB),
}


class Session:
    """One Ray driver connection for a run, with its probe-actor pools (see :mod:`.hosts`)."""

    def __init__(self, address: str | None = None, layout: dict[str, NodeSpec] | None = None):
        self.address = address
        self.layout = dict(layout or CONFORMANCE_LAYOUT)  # the first entry is the driver's node
        self.cluster: Any = None
        self.nodes: dict[str, str | None] = {}
        self.pools: dict[tuple, Any] = {}
        self.started_at: float | None = None
        self.restarts = 0

    @property
    def started(self) -> bool:
        """Whether the cluster is up (started or connected, and not torn down since)."""
        return bool(self.nodes)

    @property
    def private(self) -> bool:
        """Whether this session started its own cluster (and so may restart it)."""
        return self.address is None

    def start(self) -> None:
        """Start (or connect to) the cluster if not yet done; InfrastructureError when Ray does not come up."""
        if ray.is_initialized() and self.nodes:
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        last: BaseException | None = None
        for attempt in range(START_ATTEMPTS):
            try:
                self._start_once()
                self.started_at = time.time()
                return
            except Exception as exc:  # noqa: BLE001 - any start-up failure is infrastructure
                last = exc
                self._stop()
                if not self.private:
                    break
                time.sleep(1.0 + attempt)
        raise InfrastructureError(f"Ray did not start: {type(last).__name__}: {last}") from last

    def _node_args(self, role: str) -> dict[str, Any]:
        spec = self.layout[role]
        return {
            "num_cpus": spec.cpus,
            "num_gpus": visible_gpus() if spec.gpus is None else spec.gpus,
            "object_store_memory": spec.store_bytes,
            "resources": {ROLE_RESOURCE.format(role): 1},
            "include_dashboard": False,
        }

    def _start_once(self) -> None:
        if self.private:
            from ray.cluster_utils import Cluster

            # Only the driver's node now: every other node costs a raylet and its agents, so it
            # starts when a check first asks for its role (see :meth:`node`).
            head = next(iter(self.layout))
            # No autoscaler monitor or log monitor: a fixed local cluster needs neither, and each is
            # a Python process competing for a small machine's cores.
            args = {**self._node_args(head), "no_monitor": True, "include_log_monitor": False, "_system_config": SYSTEM_CONFIG}
            self.cluster = Cluster(initialize_head=True, head_node_args=args)
            # Registered after the cluster's own exit hook, so it runs first: the driver disconnects
            # before the nodes are killed (a driver whose raylet dies under it exits with status 1).
            atexit.register(self._stop)
            ray.init(address=self.cluster.address, logging_level="ERROR", log_to_driver=False)
            self.nodes = {head: ray.get_runtime_context().get_node_id()}
        else:
            if not ray.is_initialized():
                ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
            here = ray.get_runtime_context().get_node_id()
            others = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here)
            self.nodes = {HEAD: here, SECOND: others[0] if others else None, SMALL: None}

    def node(self, role: str) -> str | None:
        """The node id playing ``role`` (``head``, ``second``, ``small``), or None if the cluster has none.

        A private session starts the role's node on first use.
        """
        self.start()
        if role not in self.nodes and self.private and role in self.layout:
            try:
                self.cluster.add_node(**self._node_args(role))
                self.cluster.wait_for_nodes()
            except Exception as exc:  # noqa: BLE001 - a node that does not come up is infrastructure
                raise InfrastructureError(f"the {role} node did not start: {type(exc).__name__}: {exc}") from exc
            key = ROLE_RESOURCE.format(role)
            self.nodes[role] = next(n["NodeID"] for n in ray.nodes() if n.get("Alive") and key in n["Resources"])
        return self.nodes.get(role)

    def nodes_in_order(self) -> list[str]:
        """Every node of the layout (started now if needed), the driver's first."""
        return [self.node(role) for role in self.layout]

    def store_capacity(self, role: str = HEAD) -> int:
        """Object store bytes of the node playing ``role``."""
        node = self.node(role)
        return next(int(n["Resources"].get("object_store_memory", 0)) for n in ray.nodes() if n["NodeID"] == node)

    def restart(self) -> None:
        """Tear everything down and start afresh (after an infrastructure error)."""
        self.restarts += 1
        self._stop()
        self.start()

    def _stop(self) -> None:
        if self.cluster is None and not self.nodes:
            return
        for pool in self.pools.values():
            pool.forget()
        self.pools.clear()
        self.nodes = {}
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - a dead cluster may fail to shut down cleanly
            pass
        if self.cluster is not None:
            try:
                self.cluster.shutdown()
            except Exception:  # noqa: BLE001
                pass
            self.cluster = None
        gc.collect()

    def shutdown(self) -> None:
        """End the session (its cluster too, if it started one)."""
        self._stop()


_CURRENT: Session | None = None


def current(address: str | None = None) -> Session:
    """The process's session, created on first use; ``address`` applies until it has started."""
    global _CURRENT
    if _CURRENT is None or (address and _CURRENT.address != address and not _CURRENT.nodes):
        _CURRENT = Session(address)
    return _CURRENT


def install(session: Session) -> Session:
    """Make ``session`` the process's session (the benchmark's own layout, say); the old one is shut down."""
    global _CURRENT
    if _CURRENT is not None and _CURRENT is not session:
        _CURRENT.shutdown()
    _CURRENT = session
    return session


def reset() -> None:
    """Shut the current session down and forget it (the next :func:`current` makes a new one)."""
    global _CURRENT
    if _CURRENT is not None:
        _CURRENT.shutdown()
    _CURRENT = None
