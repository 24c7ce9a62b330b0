"""Two results files side by side: per cell and metric, the ratio and whether it regressed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: Metrics worth a regression verdict (the rest are shown for context only).
KEY_METRICS = (
    "load_cold_s", "load_warm_s", "first_forward_s", "actor_uss_infer_bytes", "pool_total_bytes", "model_cost_bytes",
    "throughput_rows_s", "latency_p50_s", "latency_p99_s", "wrap_s", "wrap_peak_bytes",
)
MACHINE_FIELDS = ("cpu_model", "cores_physical", "cores_logical", "ram_bytes", "gpus", "platform")


@dataclass
class Row:
    """One metric of one cell in both files."""

    cell: str
    metric: str
    a: float | None
    b: float | None
    unit: str
    better: str
    worse_by: float | None  # > 1: b is worse than a by this factor
    regression: bool


@dataclass
class Comparison:
    """Rows, regressions, cells only in one file, validity changes and machine differences."""

    rows: list[Row] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    status_changes: list[str] = field(default_factory=list)
    machine_diffs: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.regression]


def worse_factor(a: float, b: float, better: str) -> float | None:
    """How many times worse ``b`` is than ``a`` (<1 means better); None when not comparable."""
    if better == "lower":
        return b / a if a > 0 else None
    if better == "higher":
        return a / b if b > 0 else None
    return None


def compare(a: dict[str, Any], b: dict[str, Any], factor: float = 1.2) -> Comparison:
    """Match cells by id; flag a key metric as a regression when b is worse than a by ``factor`` or more."""
    if factor < 1:
        raise ValueError("factor must be at least 1")
    out = Comparison()
    ca = {c["id"]: c for c in a["cells"]}
    cb = {c["id"]: c for c in b["cells"]}
    out.only_a = sorted(set(ca) - set(cb))
    out.only_b = sorted(set(cb) - set(ca))
    for cid in [c["id"] for c in a["cells"] if c["id"] in cb]:
        x, y = ca[cid], cb[cid]
        if (x["status"], x["validity"]) != (y["status"], y["validity"]):
            out.status_changes.append(f"{cid}: {x['status']}/{x['validity']} -> {y['status']}/{y['validity']}")
            if x["validity"] == "VALID" and y["validity"] == "INVALID":
                out.rows.append(Row(cid, "validity", None, None, "", "none", None, True))
        if x["status"] != "ok" or y["status"] != "ok":
            continue
        for name in KEY_METRICS:
            ma, mb = x["metrics"].get(name), y["metrics"].get(name)
            if ma is None or mb is None:
                continue
            better = ma.get("better", "none")
            wf = worse_factor(ma["value"], mb["value"], better)
            out.rows.append(Row(cid, name, ma["value"], mb["value"], ma["unit"], better, wf, wf is not None and wf >= factor))
    for f in MACHINE_FIELDS:
        va, vb = a["machine"].get(f), b["machine"].get(f)
        if va != vb:
            out.machine_diffs.append(f"{f}: {va} vs {vb}")
    if a.get("suite_fingerprint") != b.get("suite_fingerprint"):
        out.machine_diffs.append(f"suite fingerprint: {a.get('suite_fingerprint')} vs {b.get('suite_fingerprint')}")
    for lib in sorted(set(a["versions"]) | set(b["versions"])):
        if a["versions"].get(lib) != b["versions"].get(lib):
            out.machine_diffs.append(f"version {lib}: {a['versions'].get(lib)} vs {b['versions'].get(lib)}")
    return out


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "B":
        return f"{v / 2**20:.1f} MiB"
    return f"{v:.4g} {unit}"


def render(c: Comparison, name_a: str, name_b: str, factor: float) -> str:
    """Plain-text side-by-side table, regressions marked, machine differences noted first."""
    lines = [f"A = {name_a}", f"B = {name_b}", f"regression: B worse than A by x{factor:g} or more", ""]
    if c.machine_diffs:
        lines.append("NOTE: the runs differ in machine, versions or suite; ratios may reflect that, not the code:")
        lines += [f"  {d}" for d in c.machine_diffs]
        lines.append("")
    width = max([len(r.cell) for r in c.rows] + [4])
    lines.append(f"{'cell':<{width}}  {'metric':<22} {'A':>14} {'B':>14} {'worse x':>8}")
    for r in c.rows:
        mark = "  REGRESSION" if r.regression else ""
        wf = "-" if r.worse_by is None else f"{r.worse_by:.2f}"
        lines.append(f"{r.cell:<{width}}  {r.metric:<22} {_fmt(r.a, r.unit):>14} {_fmt(r.b, r.unit):>14} {wf:>8}{mark}")
    for label, items in (("only in A", c.only_a), ("only in B", c.only_b), ("status/validity changed", c.status_changes)):
        if items:
            lines.append(f"\n{label}:")
            lines += [f"  {i}" for i in items]
    lines.append(f"\n{len(c.regressions)} regression(s)")
    return "\n".join(lines)
