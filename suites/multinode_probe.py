"""Subprocess entry point: runs one scenario on a private multi-node (or small-store) Ray cluster.

A check cannot reshape the Ray instance it already runs in, so it starts
``python -m zcbench.suites.multinode_probe --impl SPEC --scenario NAME`` and reads the
one JSON object this prints last on stdout. Scenarios:

``one_copy_per_node``: head (node A) + one added node (B), each with its own object
store; one actor on A, two on B; outputs, residency and each node's store bytes.
``near_capacity``: one node whose store is smaller than the model; does wrap refuse,
or do actors load a correct model anyway (and where do its bytes lie)?
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any

MiB = 2**20


def _run(model, inputs):
    import torch

    with torch.no_grad():
        return model(*inputs)


def _node_of(actor_handle) -> str:
    import ray

    return ray.get(actor_handle.apply.remote(_node_id))


def _node_id(_model) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def one_copy_per_node(impl, model_mib: int, store_mib: int) -> dict[str, Any]:
    """Wrap on node A, load once on A and twice on B; report outputs, residency and store bytes per node."""
    import ray
    import torch

    from zcbench.suites import actors, probes
    from zcbench.suites.cases import blob_case
    from zcbench.suites.cluster import start_simulated_cluster

    cluster = start_simulated_cluster(
        2, num_cpus=2, store_bytes=store_mib * MiB, resources=[{"node_a": 1}, {"node_b": 1}]
    )
    try:
        node_a = ray.get_runtime_context().get_node_id()  # the driver connects to the head
        node_b = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != node_a)
        case = blob_case(model_mib)
        original = case.build()
        inputs = case.inputs()
        expected = case.run(original, inputs)
        model_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
        before = probes.store_bytes_by_node()
        wrapped = impl.wrap(original, "actor")
        on_b = actors.spawn(impl, wrapped, 2, resources={"node_b": 0.01})
        on_a = actors.spawn(impl, wrapped, 1, resources={"node_a": 0.01})
        pool = on_a + on_b
        outputs = ray.get([a.apply.remote(_run, inputs) for a in pool])
        residency = ray.get([a.residency.remote(100 * 1024) for a in pool])
        nodes = [_node_of(a) for a in pool]
        after = probes.store_bytes_by_node()
        return {
            "ok": True,
            "model_bytes": model_bytes,
            "node_a": node_a,
            "node_b": node_b,
            "actor_nodes": nodes,
            "outputs_identical": [bool(torch.equal(o, expected)) for o in outputs],
            "residency": residency,
            "store_before": before,
            "store_after": after,
        }
    finally:
        ray.shutdown()
        cluster.shutdown()


def near_capacity(impl, model_mib: int, store_mib: int) -> dict[str, Any]:
    """Wrap a model larger than the node's object store and load it in two actors."""
    import ray
    import torch

    from zcbench.suites import actors, probes
    from zcbench.suites.cases import blob_case

    ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=store_mib * MiB,
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        case = blob_case(model_mib)
        original = case.build()
        inputs = case.inputs()
        expected = case.run(original, inputs)
        result: dict[str, Any] = {"ok": True, "store_capacity": store_mib * MiB}
        result["model_bytes"] = sum(p.numel() * p.element_size() for p in original.parameters())
        try:
            wrapped = impl.wrap(original, "actor")
        except Exception as exc:  # refusing is a legitimate answer; the check judges the message
            result.update(wrap_raised=f"{type(exc).__name__}: {exc}")
            return result
        result["wrap_raised"] = None
        result["store_after_wrap"] = probes.store_bytes_by_node()
        try:
            pool = actors.spawn(impl, wrapped, 2)
            outputs = ray.get([a.apply.remote(_run, inputs) for a in pool], timeout=120)
            result["outputs_identical"] = [bool(torch.equal(o, expected)) for o in outputs]
            result["residency"] = ray.get([a.residency.remote(100 * 1024) for a in pool])
            result["store_paths"] = sorted(set(ray.get(pool[0].apply.remote(_store_paths))))
            result["load_raised"] = None
        except Exception as exc:
            result["load_raised"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        return result
    finally:
        ray.shutdown()


def _store_paths(_model) -> list[str]:
    """Files behind this process's object store mappings (tmpfs or a disk fallback)."""
    with open("/proc/self/maps") as maps:
        return [line.split(maxsplit=5)[5].strip() for line in maps if "plasma" in line]


SCENARIOS = {"one_copy_per_node": one_copy_per_node, "near_capacity": near_capacity}


def main(argv: list[str] | None = None) -> int:
    """Run the scenario and print its result as one JSON line (``ok: false`` with the error on failure)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", required=True, help="implementation name or module:factory spec")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="one_copy_per_node")
    parser.add_argument("--model-mib", type=int, default=64)
    parser.add_argument("--store-mib", type=int, default=256)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    start = time.perf_counter()
    try:
        from zcbench.suites.contract import load_implementation

        impl = load_implementation(args.impl)
        result = SCENARIOS[args.scenario](impl, args.model_mib, args.store_mib)
    except Exception as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    result["wall_s"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result), flush=True)
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
