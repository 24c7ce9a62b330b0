"""The committed conformance matrix is one run of the current checks over every shipped implementation.

A change to any check or probe changes the suite fingerprint and fails this test until the
matrix is regenerated (the command is in README.md), so results/ never describes other checks.
"""

from __future__ import annotations

from pathlib import Path

from zcbench.harness import schema
from zcbench.suites import fingerprint
from zcbench.suites.contract import REGISTRY
from zcbench.suites.registry import all_checks

MATRIX = Path(__file__).resolve().parents[2] / "results" / "conformance" / "matrix.json"


def test_committed_matrix_is_current_complete_and_valid() -> None:
    matrix = schema.load(MATRIX, kind="matrix")
    assert matrix["suite_fingerprint"] == fingerprint.current(), (
        f"{MATRIX} was made by suite {matrix['suite_fingerprint']}, the checks are now {fingerprint.current()}: "
        "regenerate it (README: 'Regenerate the committed conformance matrix')"
    )
    assert matrix["complete"] and matrix["select"] is None and matrix["profile"] == "zcbench-ci"
    assert list(matrix["implementations"]) == list(REGISTRY), "one column per shipped implementation, in registry order"
    ids = [c.id for c in all_checks()]
    for name, column in matrix["implementations"].items():
        assert column["status"] == "ok", f"{name}: {column['status']} {column['reason']}"
        assert [r["check_id"] for r in column["results"]] == ids, name
        assert column["provenance"]["suite_fingerprint"] == matrix["suite_fingerprint"], name
        assert not column["provenance"]["dirty"], f"{name}: made from a tree with uncommitted changes"
    commits = {c["provenance"]["commit"] for c in matrix["implementations"].values()}
    assert len(commits) == 1, f"columns made at different commits: {commits}"
    reference = matrix["implementations"]["reference"]
    assert not [r for r in reference["results"] if r["status"] in ("fail", "error")], "the reference fails its own suite"
