"""Several nodes: each node's object store holds the model once, however many actors use it there.

The private session has a second node with its own object store; on an existing cluster
any other alive node plays that part.
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from .. import hosts, models, probes
from ..contract import release
from ..registry import SkipCheck, check
from ..session import HEAD, SECOND, current
from .zero_copy import ONE_COPY


def _run(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def judge_one_copy(report: dict[str, Any], zero_copy: bool) -> dict[str, Any]:
    """Assert outputs, residency and node B's store bytes from a ``one_copy_per_node`` report."""
    bad = [i for i, same in enumerate(report["outputs_identical"]) if not same]
    assert not bad, f"multi_node: actors {bad} (of 3 on 2 nodes) compute outputs different from the original"
    nodes = report["actor_nodes"]
    assert nodes.count(report["node_b"]) == 2 and nodes.count(report["node_a"]) == 1, (
        f"multi_node: actors were not placed 1 on node A and 2 on node B: {nodes}"
    )
    model = report["model_bytes"]
    b = report["node_b"]
    grown_b = report["store_after"].get(b, 0) - report["store_before"].get(b, 0)
    observed = {"model_bytes": model, "node_b_store_growth": grown_b}
    if zero_copy:
        for i, r in enumerate(report["residency"]):
            assert r["bytes_total"] and r["bytes_in_store"] == r["bytes_total"], (
                f"multi_node: actor {i} on node {nodes[i][:8]} holds {r['bytes_total'] - r['bytes_in_store']} "
                f"weight bytes outside its node's object store ({', '.join(r['outside'][:3])})"
            )
        lo, hi = ONE_COPY
        assert lo * model <= grown_b <= hi * model, (
            f"multi_node: node B's object store grew by {grown_b / model:.2f}x the model ({grown_b} B) "
            f"for 2 actors; one copy per node is {lo}-{hi}x"
        )
    return observed


@check("multi_node.one_copy_per_node", requires=("cpu", "multi_node"), hosts={"head": 1, "second": 2})
def check_one_copy_per_node(impl) -> dict[str, Any]:
    """On two nodes, 2 actors on node B share one copy in B's store; all 3 actors' outputs are exact."""
    session = current()
    node_a, node_b = session.node(HEAD), session.node(SECOND)
    if node_b is None:
        raise SkipCheck("needs a cluster of at least two nodes; this one has one")
    case = models.blob_case(64)
    original = models.build(case)
    inputs = case.inputs()
    expected = case.run(original, inputs)
    before = probes.store_bytes_by_node()
    wrapped = impl.wrap(original, "actor")
    pool: list[hosts.Loaded] = []
    try:
        pool += hosts.load(impl, wrapped, 2, role=SECOND)
        pool += hosts.load(impl, wrapped, 1, role=HEAD)
        after = probes.store_bytes_by_node()
        outputs = ray.get([a.apply(_run, inputs) for a in pool])
        residency = ray.get([a.residency(100 * 1024) for a in pool])
    finally:
        hosts.release(pool)
        release(impl, wrapped)
    report = {
        "model_bytes": probes.model_bytes(original),
        "node_a": node_a,
        "node_b": node_b,
        "actor_nodes": [a.node for a in pool],
        "outputs_identical": [bool(torch.equal(o, expected)) for o in outputs],
        "residency": residency,
        "store_before": before,
        "store_after": after,
    }
    return judge_one_copy(report, impl.capabilities.zero_copy)
