"""The measuring process: owns one Ray driver and answers cell requests as JSON lines.

The orchestrator (bench.py) starts one such process per group of implementations that
need the same driver environment (Ray's built-in zero-copy reads
RAY_ENABLE_ZERO_COPY_TORCH_TENSORS when ``ray`` is imported, so it cannot share a driver
with implementations that must not see it). A killed or hung worker costs one cell, not
the run. Replies go to the original stdout; everything else printed goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path


def main() -> int:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # libraries that print must not corrupt the protocol
    address = os.environ.get("ZCBENCH_RAY_ADDRESS") or None
    nodes = int(os.environ.get("ZCBENCH_NODES") or 1)  # > 1: simulated nodes in a private cluster
    cluster = None
    workdir = Path(tempfile.mkdtemp(prefix="zcbench-bench-"))

    def reply(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    try:
        import ray

        from zcbench.suites.cluster import ensure_ray, start_simulated_cluster

        for attempt in range(3):
            try:
                if nodes > 1:
                    cluster = start_simulated_cluster(nodes)
                else:
                    ensure_ray(address)
                break
            except Exception:
                # Ray waits only 30 s (hard-coded) for its raylet; a loaded machine can be slower.
                ray.shutdown()
                if address or attempt == 2:
                    raise

        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        reply({"ok": True, "ready": True, "ray": ray.__version__, "nodes": alive, "zero_copy_env": os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS")})
    except Exception as exc:  # e.g. a Ray address that does not answer
        reply({"ok": False, "ready": False, "error": f"cannot start or reach Ray: {exc}"})
        return 2

    from zcbench.suites.contract import load_implementation

    from . import cells

    impls: dict[str, object] = {}
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "quit":
            break
        try:
            name = req["impl"]
            if name not in impls:
                impls[name] = load_implementation(name)
            out = cells.measure(impls[name], req["params"], req["rows"], req["seed"], workdir)
            reply({"ok": True, **out})
        except Exception as exc:
            reply({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=8)})
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    if cluster is not None:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
