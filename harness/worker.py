"""The measuring process: owns one Ray driver and answers cell requests as JSON lines.

The orchestrator (bench.py) starts one such process per group of implementations that
need the same driver environment (Ray's built-in zero-copy reads
RAY_ENABLE_ZERO_COPY_TORCH_TENSORS when ``ray`` is imported, so it cannot share a driver
with implementations that must not see it). A killed or hung worker costs one cell, not
the run. Replies go to the original stdout; everything else printed goes to stderr.

Its cluster is the suite's session (:mod:`zcbench.suites.session`): an existing one
(``ZCBENCH_RAY_ADDRESS``) or a private one of ``ZCBENCH_NODES`` identical simulated nodes,
each with ``ZCBENCH_NODE_CPUS`` logical CPUs and a ``ZCBENCH_STORE_BYTES`` object store.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

MiB = 2**20
DEFAULT_STORE_BYTES = 1024 * MiB
DEFAULT_NODE_CPUS = 4


def layout(nodes: int, cpus: int, store_bytes: int) -> dict:
    """``nodes`` identical simulated nodes: the driver's (``head``) and ``node1`` ... ``node<N-1>``."""
    from zcbench.suites.session import HEAD, NodeSpec

    spec = NodeSpec(cpus, store_bytes)
    return {HEAD: spec, **{f"node{i}": spec for i in range(1, nodes)}}


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print must not corrupt the protocol
    address = os.environ.get("ZCBENCH_RAY_ADDRESS") or None
    nodes = int(os.environ.get("ZCBENCH_NODES") or 1)
    cpus = int(os.environ.get("ZCBENCH_NODE_CPUS") or DEFAULT_NODE_CPUS)
    store = int(os.environ.get("ZCBENCH_STORE_BYTES") or DEFAULT_STORE_BYTES)
    workdir = Path(tempfile.mkdtemp(prefix="zcbench-bench-"))

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    from zcbench.suites import session

    try:
        current = session.install(session.Session(address, layout=layout(nodes, cpus, store)))
        current.start()
        if current.private:
            current.nodes_in_order()  # the session starts nodes on first use; a cell spreads its pool over all of them
        import ray

        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        reply({"ok": True, "ready": True, "ray": ray.__version__, "nodes": alive,
               "zero_copy_env": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS")})  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - e.g. a Ray address that does not answer
        reply({"ok": False, "ready": False, "error": f"cannot start or reach Ray: {exc}"})
        return 2

    from zcbench.suites.contract import load_implementation

    from . import cells

    impls: dict[str, object] = {}
    try:
        for line in sys.stdin:
            req = json.loads(line)
            if req.get("op") == "quit":
                break
            try:
                name = req["impl"]
                if name not in impls:
                    impls[name] = load_implementation(name)
                out = cells.measure(impls[name], req["params"], cells.Job.from_dict(req["job"]), workdir)
                reply({"ok": True, **out})
            except Exception as exc:  # noqa: BLE001 - any failure is this cell's, reported with its trace
                reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=8)})
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        session.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
