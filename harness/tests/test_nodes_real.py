"""``zcbench run --nodes 2``: a private cluster of two simulated nodes, the pool spread over them.

Runs the real CLI in a subprocess (its cluster cannot live in the test session's Ray)
and reads the per-node store bytes from the results file: with the pool on both nodes,
each node's store holds the model once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from zcbench.harness import cli

MiB = 2**20
MODEL_MIB = 16


def test_two_simulated_nodes_hold_the_model_once_each(tmp_path):
    out = tmp_path / "nodes.json"
    cmd = [sys.executable, "-m", "zcbench.harness.cli", "run", "--impl", "reference", "--model", f"mlp-{MODEL_MIB}mib",
           "--pool", "4", "--batch", "8", "--rounds", "1", "--warmup", "0", "--rows", "64", "--nodes", "2",
           "--out", str(out)]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["settings"]["nodes"] == 2
    [cell] = doc["cells"]
    assert cell["status"] == "ok" and cell["validity"] == "VALID", cell
    m = {k: v["value"] for k, v in cell["metrics"].items()}
    assert m["num_nodes"] == 2
    size = m["model_bytes"]
    for node in ("store_bytes_node0", "store_bytes_node1"):
        # Two actors per node: one copy in each node's store, never two.
        assert 0.95 * size <= m[node] <= 1.25 * size, (node, m[node] / size)
    assert m["store_bytes"] >= 1.9 * size  # the pool total counts each node's copy
    assert m["load_cold_remote_s"] > 0 and m["load_warm_s"] > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes must be between 1 and"),
        (["--nodes", "9"], "--nodes must be between 1 and"),
        (["--nodes", "2", "--ray-address", "127.0.0.1:1"], "with --ray-address the cluster's own nodes"),
        (["--pool", "3"], "pool size(s) [3] not in"),
    ],
)
def test_bad_cluster_options_are_named(argv, message, tmp_path, capsys):
    rc = cli.main(["run", "--impl", "reference", "--model", "mlp-8mib", "--out", str(tmp_path / "x.json"), *argv])
    assert rc == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
