"""The main job: conformance of the reference and naive, then a benchmark that shows the headline, one summary.

``zcbench main --out results/latest`` (the quick profile) writes::

    results/latest/conformance/matrix.{json,md}   every check, reference and naive
    results/latest/bench/results.json             load time and pool memory vs pool size for every installed
                                                  implementation at one model size, one throughput point
    results/latest/bench/report.md + *.png        tables and plots
    results/latest/SUMMARY.md                     one screen: verdicts and the headline

``--full`` runs the full benchmark matrix instead (every pool and batch size, three rounds)
and prints its expected duration before it starts. :func:`main_job` is a plain function of
:class:`JobSettings`; the command line (cli.py) only builds them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from . import matrix

#: Implementations whose conformance the main job records.
CONFORMANCE_IMPLS = ("reference", "naive")
CONFORMANCE_TIMEOUT_S = 2400.0
#: Conformance runs at a time (each its own private cluster): reference and naive took 166 s two at a time, 86 s
#: for reference alone, on this 2-core machine class (each run is CPU-bound, ~120 CPU-s).
CONFORMANCE_JOBS = 2


@dataclass
class JobSettings:
    """What the main job does; ``bench`` None means the quick (or, with ``full``, the full) matrix of what is installed."""

    out: Path = Path("results/latest")
    full: bool = False
    conformance_impls: list[str] = field(default_factory=lambda: list(CONFORMANCE_IMPLS))
    conformance: bool = True
    benchmark: bool = True
    ray_address: str | None = None
    bench: matrix.Settings | None = None


def bench_settings(s: JobSettings, installed: list[str]) -> matrix.Settings:
    """The benchmark matrix of the job: ``s.bench`` if given, else quick or full over ``installed``."""
    if s.bench is not None:
        return s.bench
    b = matrix.full_settings(installed) if s.full else matrix.quick_settings(installed)
    b.ray_address = s.ray_address
    return b


def expected_seconds(s: JobSettings, b: matrix.Settings) -> float:
    """The job's expected duration on an idle 2-core machine: conformance runs plus the benchmark's estimate."""
    from . import estimate

    conf = estimate.conformance_seconds(len(s.conformance_impls), conformance_jobs(s)) if s.conformance else 0.0
    envs = 2 if any(i == "ray-builtin" for i in b.impls) else 1  # ray-builtin needs a driver of its own
    return conf + (estimate.run_seconds(b, envs) if s.benchmark else 0.0)


def conformance_jobs(s: JobSettings) -> int:
    """Implementations checked at a time: one on a shared cluster (``ray_address``), else :data:`CONFORMANCE_JOBS`."""
    return 1 if s.ray_address else min(CONFORMANCE_JOBS, max(1, len(s.conformance_impls)))


def _conformance(s: JobSettings) -> tuple[int, list[str]]:
    from . import conformance

    result = conformance.run_matrix(list(s.conformance_impls), s.out / "conformance", ray_address=s.ray_address,
                                    timeout_s=CONFORMANCE_TIMEOUT_S, command=["zcbench", "main"],
                                    jobs=conformance_jobs(s))  # fmt: skip
    lines = ["## Conformance (CI profile)", ""] + [f"- {conformance.headline(r)}" for r in result["implementations"].values()]
    ref = result["implementations"].get("reference")
    rc = 0 if ref is not None and ref["status"] == "ok" and not any(r["status"] == "failed" for r in ref["results"]) else 1
    return rc, lines + ["", f"Full table: {s.out / 'conformance' / 'matrix.md'}", ""]


def _benchmark(s: JobSettings, b: matrix.Settings, stream: TextIO) -> tuple[int, list[str]]:
    from . import bench, report

    results = s.out / "bench" / "results.json"
    doc = bench.new_document(b, bench.implementation_info(b.impls), ["zcbench", "main"] + (["--full"] if s.full else []))
    try:
        bench.execute(doc, results, stream=stream)
    except ConnectionError as exc:
        return 1, ["## Benchmark", "", f"the measuring process did not start: {exc}", ""]
    lines = ["## Benchmark" + (" (full matrix)" if s.full else " (quick profile)"), ""]
    cells = report.ok_cells(doc)
    if cells:
        report.write_report(doc, s.out / "bench")
        lines += report.headline(cells)
    else:
        lines.append("no cell finished")
    failed = [c for c in doc["cells"] if c["status"] == "failed" or c["validity"] == "INVALID"]
    lines += [f"- `{c['id']}`: {c['status']}/{c['validity']} {c.get('error') or c.get('audit') or ''}" for c in failed]
    lines += ["", f"Report with plots: {s.out / 'bench' / 'report.md'}", ""]
    return (1 if failed or not cells else 0), lines


def main_job(s: JobSettings, installed: list[str] | None = None, stream: TextIO | None = None) -> int:
    """Run the job; 0 only if the reference passes conformance and every benchmark cell is VALID."""
    from . import bench
    from .estimate import clock
    from .schema import write_text_atomic

    stream = stream or sys.stderr
    s.out.mkdir(parents=True, exist_ok=True)
    b = bench_settings(s, installed if installed is not None else bench.installed_impls())
    matrix.validate(b)
    what = "full" if s.full else "quick"
    print(f"zcbench main ({what}): expected about {clock(expected_seconds(s, b))} on an idle 2-core machine "
          f"(conformance of {', '.join(s.conformance_impls) if s.conformance else 'nothing'}; benchmark of "
          f"{len(b.impls)} implementations, {len(matrix.cell_keys(b)) * len(b.impls)} cells x {b.rounds} round(s))",
          file=stream, flush=True)  # fmt: skip
    summary = [f"# zcbench main job ({what})", ""]
    rc = 0
    if s.conformance:
        code, lines = _conformance(s)
        rc, summary = rc or code, summary + lines
    if s.benchmark:
        code, lines = _benchmark(s, b, stream)
        rc, summary = rc or code, summary + lines
    text = "\n".join(summary) + "\n"
    write_text_atomic(s.out / "SUMMARY.md", text)
    print(text)
    return rc

