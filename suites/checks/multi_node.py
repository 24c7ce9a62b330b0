"""Several nodes: each node's object store holds the model once, however many actors use it there.

The check needs a Ray instance with two nodes, so it runs :mod:`zcbench.suites.multinode_probe`
in a subprocess (with the implementation's worker environment) and judges its JSON report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from ..registry import check

TIMEOUT_S = 240
MODEL_MIB = 64
#: Store bytes on node B may exceed the model by this factor (metadata, small objects), never 2x.
STORE_SLACK = 1.25


def run_probe(impl, scenario: str, *, model_mib: int, store_mib: int, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Run the probe subprocess for ``impl`` and return its JSON report (AssertionError on timeout or crash)."""
    env = {**os.environ, **impl.capabilities.worker_env}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    # The spec resolved here must resolve there too (it may name a module found via this sys.path).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    cmd = [
        sys.executable, "-m", "zcbench.suites.multinode_probe", "--impl", impl.spec,
        "--scenario", scenario, "--model-mib", str(model_mib), "--store-mib", str(store_mib),
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{scenario}: probe cluster did not finish within {timeout_s} s") from exc
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(f"{scenario}: probe exited {done.returncode} without a report: {done.stderr.strip()[-400:]}")
    report = json.loads(lines[-1])
    if not report.get("ok"):
        raise AssertionError(f"{scenario}: probe failed: {report.get('error')}")
    return report


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
    observed = {"model_bytes": model, "node_b_store_growth": grown_b, "probe_wall_s": report["wall_s"]}
    if zero_copy:
        for i, r in enumerate(report["residency"]):
            assert r["bytes_total"] and r["bytes_in_store"] == r["bytes_total"], (
                f"multi_node: actor {i} on node {nodes[i][:8]} holds {r['bytes_total'] - r['bytes_in_store']} "
                f"weight bytes outside its node's object store ({', '.join(r['outside'][:3])})"
            )
        assert grown_b <= STORE_SLACK * model, (
            f"multi_node: node B's object store grew by {grown_b / model:.2f}x the model ({grown_b} B) "
            f"for 2 actors; one copy per node allows at most {STORE_SLACK}x"
        )
    return observed


@check("multi_node.one_copy_per_node", requires=("cpu", "multi_node"), slow=True)
def check_one_copy_per_node(impl) -> dict[str, Any]:
    """On a 2-node cluster, 2 actors on one node share one store copy; all 3 actors' outputs are exact."""
    report = run_probe(impl, "one_copy_per_node", model_mib=MODEL_MIB, store_mib=256)
    return judge_one_copy(report, impl.capabilities.zero_copy)
