"""The main job: conformance of the reference, then the quick benchmark against the baselines, one report.

``zcbench main --out results/latest`` writes::

    results/latest/conformance/matrix.{json,md}   every check, reference vs the installed implementations
    results/latest/bench/quick.json               the quick benchmark matrix (versioned JSON)
    results/latest/bench/report.md + *.png        tables and plots
    results/latest/SUMMARY.md                     one screen: verdicts and headline figures
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

#: Implementations whose conformance is recorded beside the reference's when they import.
CONFORMANCE_IMPLS = ("reference", "naive")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("results/latest"), help="output directory")
    parser.add_argument("--impl", action="append", help="conformance implementations (default: reference, naive)")
    parser.add_argument("--skip-conformance", action="store_true", help="benchmark only")
    parser.add_argument("--skip-bench", action="store_true", help="conformance only")
    parser.add_argument("--ray-address", help="use this existing Ray cluster")


def _bench(out: Path, ray_address: str | None) -> tuple[int, dict[str, Any] | None]:
    from . import cli, schema

    results = out / "bench" / "quick.json"
    argv = ["run", "--quick", "--out", str(results)]
    if ray_address:
        argv += ["--ray-address", ray_address]
    rc = cli.main(argv)
    if not results.exists():
        return rc, None
    cli.main(["report", str(results), "--out", str(out / "bench")])
    return rc, schema.load(results)


def _pool_headline(doc: dict[str, Any]) -> list[str]:
    """Median figures of the largest pool, per implementation, from the benchmark cells."""
    ok = [c for c in doc["cells"] if c["status"] == "ok"]
    if not ok:
        return ["no finished benchmark cells"]
    pool = max(c["params"]["pool"] for c in ok)
    lines = ["| implementation | pool | load warm (ms) | USS/actor (MiB) | pool total (MiB) | rows/s | audit |", "|---|---|---|---|---|---|---|"]
    for c in ok:
        if c["params"]["pool"] != pool:
            continue
        m = c["metrics"]

        def med(name: str, scale: float = 1.0) -> str:
            v = m.get(name, {}).get("value")
            return "n/a" if v is None else f"{v * scale:.0f}"

        lines.append(
            f"| {c['params']['impl']} (batch {c['params']['batch']}) | {pool} | {med('load_warm_s', 1e3)} | "
            f"{med('actor_uss_load_bytes', 2**-20)} | {med('pool_total_bytes', 2**-20)} | "
            f"{med('throughput_rows_s')} | {c.get('validity', '?')} |"
        )
    return lines


def main(args: argparse.Namespace) -> int:
    """Run conformance and the quick benchmark; 0 only if the reference passes and every cell is VALID."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    summary = ["# zcbench main job", ""]
    rc = 0
    if not args.skip_conformance:
        from . import conformance

        matrix = conformance.run_matrix(
            list(args.impl or CONFORMANCE_IMPLS), out / "conformance", ray_address=args.ray_address, timeout_s=2400
        )
        summary += ["## Conformance (CI profile)", ""]
        summary += [f"- {conformance.headline(r)}" for r in matrix["implementations"].values()]
        ref = matrix["implementations"].get("reference")
        if ref is None or ref["status"] != "ok" or any(r["status"] == "failed" for r in ref["results"]):
            rc = 1
        summary += ["", f"Full table: {out / 'conformance' / 'matrix.md'}", ""]
    if not args.skip_bench:
        bench_rc, doc = _bench(out, args.ray_address)
        rc = rc or bench_rc
        summary += ["## Quick benchmark", ""]
        summary += _pool_headline(doc) if doc else ["the benchmark wrote no results"]
        summary += ["", f"Report with plots: {out / 'bench' / 'report.md'}", ""]
    text = "\n".join(summary) + "\n"
    (out / "SUMMARY.md").write_text(text)
    print(text)
    return rc


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m zcbench.harness.main_job", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
