"""One real small cell, end to end through ``zcbench run`` on two simulated nodes, reference vs naive.

The only test here that measures: a private two-node cluster (its own subprocess; it cannot
live in the test session's Ray), the shared Ray Data pipeline with fresh pool actors, the
driver's readings of their memory, the audit. Assertions are wide: what it proves is that
the figures tell sharing from copying, never how fast anything is.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from zcbench.harness import cli

MiB = 2**20
MODEL_MIB = 32
POOL = 2  # one actor per node (Ray Data spreads the pool): the smallest pool that crosses nodes


def test_two_nodes_reference_vs_naive(tmp_path):
    out = tmp_path / "nodes.json"
    cmd = [sys.executable, "-m", "zcbench.harness.cli", "run", "--impl", "reference", "--impl", "naive",
           "--model", f"mlp-{MODEL_MIB}mib", "--pool", str(POOL), "--batch", "8", "--rounds", "1",
           "--steady-batches", "5", "--audit-batches", "2", "--nodes", "2", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "round 1/1: VALID" in done.stderr  # progress lines on a pipe
    assert stat.S_IMODE(out.stat().st_mode) & 0o044 == 0o044  # readable by others
    doc = json.loads(out.read_text())
    assert doc["settings"]["nodes"] == 2 and len(doc["suite_fingerprint"]) == 16
    cells = {c["params"]["impl"]: c for c in doc["cells"]}
    for impl, c in cells.items():
        assert c["status"] == "ok" and c["validity"] == "VALID", (impl, c.get("error"), c.get("audit"))
    ref = {k: v["value"] for k, v in cells["reference"]["metrics"].items()}
    naive = {k: v["value"] for k, v in cells["naive"]["metrics"].items()}
    size = ref["model_bytes"]
    assert ref["num_nodes"] == 2 and size >= 0.99 * MODEL_MIB * MiB
    assert ref["store_bytes_node0"] >= 0.95 * size  # the driver's copy
    assert ref["store_bytes"] <= 2 * 1.25 * size  # at most one copy per node, never one per actor
    assert ref["in_store_fraction"] == 1.0 and naive["in_store_fraction"] == 0.0
    for m in (ref, naive):
        # throughput needs a window in which both actors were steady; on two simulated nodes Ray Data
        # may start one actor after the other has finished, so only per-call latency is certain here
        assert m["load_cold_s"] > 0 and m["latency_p50_s"] > 0 and m["steady_batches_min"] >= 1
        assert m["empty_uss_bytes"] > 50 * MiB and m["pool_empty_bytes"] >= POOL * m["empty_uss_bytes"]
    # sharing vs copying: each naive actor pays a private copy (USS); the reference's pool maps one copy per node
    assert naive["actor_model_uss_bytes"] - ref["actor_model_uss_bytes"] > 0.7 * size
    assert naive["pool_private_bytes"] - ref["pool_private_bytes"] > 0.7 * POOL * size
    # the reference costs one copy per node (the store's); naive its private copies on top of the store's
    assert 0.7 * ref["num_nodes"] < ref["model_copies"] < 1.5 * ref["num_nodes"]
    assert naive["model_copies"] - ref["model_copies"] > 0.7 * POOL


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "0"], "--nodes must be between 1 and"),
        (["--nodes", "9"], "--nodes must be between 1 and"),
        (["--nodes", "2", "--ray-address", "127.0.0.1:1"], "with --ray-address the cluster's own nodes"),
        (["--pool", "3"], "pool size(s) [3] not in"),
        (["--steady-batches", "0"], "--steady-batches must be at least 1"),
    ],
)
def test_bad_cluster_options_are_named(argv, message, tmp_path, capsys):
    rc = cli.main(["run", "--impl", "reference", "--model", "mlp-8mib", "--out", str(tmp_path / "x.json"), *argv])
    assert rc == cli.EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
