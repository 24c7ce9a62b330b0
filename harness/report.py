"""The Markdown report of a results file: context, verdicts, the headline, tables, figures, method notes.

Figures come from :mod:`.plots`. A file measured by another suite fingerprint (or by one
from before fingerprints) is marked STALE in the header and in every verdict.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import plots, schema
from .stale import stale_reason

MiB = 2**20
#: The IBM zero-copy-loading blog's published BERT-base figures (load in a Ray actor).
IBM_ZERO_COPY_S = 5.3e-3
IBM_PRIVATE_S = 1.81
#: Implementations that own a private copy per actor: the baseline of the IBM table.
PRIVATE_BASELINE = "naive"


class ReportError(ValueError):
    """Nothing to report (no finished cell)."""


def ok_cells(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells that finished."""
    return [c for c in doc["cells"] if c["status"] == "ok"]


def verdicts(doc: dict[str, Any], stale: str | None = None) -> dict[str, dict[str, Any]]:
    """Per implementation: counts by status and a verdict (INVALID if any cell failed its audit; STALE appended)."""
    out: dict[str, dict[str, Any]] = {}
    for c in doc["cells"]:
        v = out.setdefault(c["params"]["impl"], {"ok": 0, "failed": 0, "skipped": 0, "missing": 0, "invalid": 0})
        v[c["status"]] += 1
        v["invalid"] += c["validity"] == "INVALID"
    for v in out.values():
        v["verdict"] = "INVALID" if v["invalid"] else ("VALID" if v["ok"] else "NO DATA")
        if stale:
            v["verdict"] += " (STALE)"
    return out


def fmt(m: dict[str, Any] | None, scale: float = 1.0, digits: int = 0, spread: bool = True) -> str:
    """``median ±IQR/2`` of a metric in ``scale`` units (``–`` when absent)."""
    if m is None or m["value"] != m["value"]:
        return "–"
    text = f"{m['value'] / scale:.{digits}f}"
    st = m.get("stats")
    if spread and st and st["n"] > 1:
        text += f" ±{st['iqr'] / scale / 2:.{digits}f}"
    return text


def fmt_range(m: dict[str, Any] | None, digits: int = 2) -> str:
    """``median [min–max]`` over rounds."""
    if m is None:
        return "–"
    st = m.get("stats") or {"min": m["value"], "max": m["value"], "n": 1}
    return f"{m['value']:.{digits}f} [{st['min']:.{digits}f}–{st['max']:.{digits}f}]"


def _order(c: dict[str, Any]) -> tuple:
    p = c["params"]
    return (p["model"], p["device"], p["pool"], p["batch"], p["impl"])


def header(doc: dict[str, Any], stale: str | None) -> list[str]:
    """Run, machine, versions, commit, fingerprint, settings, cluster."""
    mach, s = doc["machine"], doc["settings"]
    lines = [f"# zcbench benchmark report — run `{doc['run_id'][:12]}`", ""]
    if stale:
        lines += [f"> **STALE**: {stale}. Re-run its command (below) with the current code before trusting these figures.", ""]
    lines += [
        f"Started {doc['created']}; wall time {doc.get('wall_s', 0):.0f} s; "
        f"{'complete' if doc['complete'] else 'INCOMPLETE (resume with zcbench run --resume)'}.",
        "",
        f"- Command: `{' '.join(doc.get('command') or [])}`",
        f"- Machine: {mach['cpu_model']}, {mach['cores_physical']} cores / {mach['cores_logical']} threads, "
        f"{mach['ram_bytes'] / 2**30:.1f} GiB RAM, GPU: {', '.join(mach.get('gpus') or []) or 'none'}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- Commit: `{doc['commit'].get('sha')}`{' (uncommitted changes)' if doc['commit'].get('dirty') else ''}; "
        f"suite fingerprint `{doc.get('suite_fingerprint', 'none')}`",
        f"- Settings: rounds {s['rounds']} (+{s['warmup']} warm-up), {s.get('steady_batches', '?')} steady batches per actor "
        f"after {s.get('warmup_calls', '?')} warm-up calls, seed {s['seed']}, models {', '.join(s['models'])}, "
        f"pools {s['pools']}, batches {s['batches']}, devices {s['devices']}",
        "- Cluster: " + (f"existing, at {s['ray_address']}" if s.get("ray_address") else
                         f"private, {s.get('nodes', 1)} simulated node(s) on this host, each with its own object store"
                         if s.get("nodes", 1) > 1 else "private, one local node"),
        "",
    ]  # fmt: skip
    return lines


def verdict_table(doc: dict[str, Any], stale: str | None) -> list[str]:
    lines = ["## Verdict per implementation", "", "| implementation | version | verdict | ok | failed | skipped | missing |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    versions = {i["name"]: i["version"] for i in doc["implementations"]}
    for impl, v in verdicts(doc, stale).items():
        lines.append(f"| {impl} | {versions.get(impl, '?')} | **{v['verdict']}** | {v['ok']} | {v['failed']} | {v['skipped']} | {v['missing']} |")
    lines += ["", "VALID: every row came out exactly once and every audited batch equals the original model's outputs bit for bit.", ""]
    return lines


def headline(cells: list[dict[str, Any]]) -> list[str]:
    """Per implementation, at the largest pool of the first model: load, what the model costs, throughput."""
    if not cells:
        return []
    model = cells[0]["params"]["model"]
    mine = [c for c in cells if c["params"]["model"] == model]
    pool = max(c["params"]["pool"] for c in mine)
    lines = [f"## Headline: {model}, pool {pool}", "",
             "| implementation | load cold ms | load warm ms | model costs (copies of the model) | pool total MiB | empty pool MiB | steady rows/s | steady speed vs naive |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in sorted((c for c in mine if c["params"]["pool"] == pool), key=_order):
        m = c["metrics"]
        lines.append(
            f"| {c['params']['impl']} (batch {c['params']['batch']}) | {fmt(m.get('load_cold_s'), 1e-3, 1)} | "
            f"{fmt(m.get('load_warm_s'), 1e-3, 1)} | {fmt(m.get('model_copies'), digits=2)} | {fmt(m.get('pool_total_bytes'), MiB)} | "
            f"{fmt(m.get('pool_empty_bytes'), MiB)} | {fmt(m.get('throughput_rows_s'))} | {fmt_range(m.get('speed_vs_naive'))} |"
        )
    lines += ["", "\"Model costs\" is the pool total minus N empty actors (see *How it was measured*): 1 means one copy "
              "serves the whole pool, N one copy per actor.", ""]  # fmt: skip
    return lines


def results_table(cells: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## All cells (median ± IQR/2 over rounds)", "",
        "| impl | model | pool | batch | load cold ms | load warm ms | 1st fwd ms | 2nd fwd ms | empty USS MiB | USS/actor MiB | "
        "model cost MiB | pool total MiB | store MiB | steady rows/s | p50 ms | p99 ms | steady batches (min) | audit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for c in sorted(cells, key=_order):
        p, m = c["params"], c["metrics"]
        remote = f" (other nodes {fmt(m['load_cold_remote_s'], 1e-3, 1)})" if "load_cold_remote_s" in m else ""
        lines.append(
            f"| {p['impl']} | {p['model']} | {p['pool']} | {p['batch']} | {fmt(m.get('load_cold_s'), 1e-3, 1)}{remote} | "
            f"{fmt(m.get('load_warm_s'), 1e-3, 1)} | {fmt(m.get('first_forward_s'), 1e-3, 1)} | {fmt(m.get('second_forward_s'), 1e-3, 1)} | "
            f"{fmt(m.get('empty_uss_bytes'), MiB)} | {fmt(m.get('actor_uss_infer_bytes'), MiB)} | {fmt(m.get('model_cost_bytes'), MiB)} | "
            f"{fmt(m.get('pool_total_bytes'), MiB)} | {fmt(m.get('store_bytes'), MiB, spread=False)} | {fmt(m.get('throughput_rows_s'))} | "
            f"{fmt(m.get('latency_p50_s'), 1e-3, 1)} | {fmt(m.get('latency_p99_s'), 1e-3, 1)} | {fmt(m.get('steady_batches_min'), spread=False)} | "
            f"{c['validity']} |"
        )
    return lines + [""]


def ratio_table(cells: list[dict[str, Any]]) -> list[str]:
    """Shared vs private steady throughput per model, pool and batch: each implementation's rows/s over naive's, paired by round."""
    rows = [c for c in cells if "speed_vs_naive" in c["metrics"] and c["params"]["impl"] != PRIVATE_BASELINE]
    if not rows:
        return []
    lines = ["## Steady-state throughput: shared vs private (same run, interleaved A B, B A, …)", "",
             "Against naive (the same model privately owned by each actor), one ratio per round, then median "
             "[min–max] over rounds: *speed* is naive's steady per-batch latency (p50) over this one's; *rows/s* is "
             "the pool's steady throughput over naive's, measured over the window in which every actor was busy "
             "(its length in seconds beside it).", "",
             "| impl | model | pool | batch | p50 ms | naive p50 ms | speed median [min–max] | speed IQR | rows/s (window s) | naive rows/s | rows/s ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    naive = {(c["params"]["model"], c["params"]["pool"], c["params"]["batch"]): c for c in cells if c["params"]["impl"] == PRIVATE_BASELINE}
    for c in sorted(rows, key=_order):
        p, m = c["params"], c["metrics"]
        b = naive.get((p["model"], p["pool"], p["batch"]), {"metrics": {}})["metrics"]
        r = m["speed_vs_naive"]
        window = f" ({fmt(m.get('throughput_window_s'), digits=1, spread=False)})" if "throughput_window_s" in m else ""
        lines.append(
            f"| {p['impl']} | {p['model']} | {p['pool']} | {p['batch']} | {fmt(m.get('latency_p50_s'), 1e-3, 1)} | "
            f"{fmt(b.get('latency_p50_s'), 1e-3, 1)} | {fmt_range(r)} | {r.get('stats', {}).get('iqr', 0):.3f} | "
            f"{fmt(m.get('throughput_rows_s'))}{window} | {fmt(b.get('throughput_rows_s'))} | {fmt_range(m.get('throughput_vs_naive'))} |"
        )
    return lines + [""]


def driver_table(cells: list[dict[str, Any]]) -> list[str]:
    """Driver memory while wrapping, per implementation and model."""
    acc: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        if "wrap_peak_ratio" in c["metrics"]:
            acc[(c["params"]["impl"], c["params"]["model"])].append(c)
    if not acc:
        return []
    lines = ["## Driver memory while wrapping", "",
             "Clean peak growth of the driver's memory during `wrap` (freed heap returned with malloc_trim, VmHWM reset "
             "through /proc/self/clear_refs), over the model's bytes: the largest over the cells and rounds of that model "
             "(object-store pages the driver still maps from an earlier round do not show again).", "",
             "| impl | model | wrap ms (median) | peak growth MiB | peak / model |", "|---|---|---|---|---|"]  # fmt: skip
    for (impl, model), cs in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = statistics.median(c["metrics"]["wrap_s"]["value"] for c in cs)
        peak = max(max(c["metrics"]["wrap_peak_bytes"].get("values") or [c["metrics"]["wrap_peak_bytes"]["value"]]) for c in cs)
        ratio = max(max(c["metrics"]["wrap_peak_ratio"].get("values") or [c["metrics"]["wrap_peak_ratio"]["value"]]) for c in cs)
        lines.append(f"| {impl} | {model} | {med * 1e3:.0f} | {peak / MiB:.0f} | {ratio:.2f} |")
    lines += ["", "`share_driver_model=True` (the reference's own option: the driver's tensors re-pointed at the stored "
              "bytes) cannot be reached through the plug-in contract's `wrap(obj, mode)`, so it is not measured here.", ""]  # fmt: skip
    return lines


def scale_table(cells: list[dict[str, Any]]) -> list[str]:
    """Load time vs tensor count and bytes, with the metadata floor and the cost per tensor."""
    mine = plots.scale_cells(cells)
    if not mine:
        return []
    lines = ["## Load time vs shape (the scaling picture)", "",
             "First load on the driver's node (pool actors of the same pool load concurrently: run `--pool 1` for "
             "uncontended loads); the metadata floor is building the same tensors as views plus their Parameters, "
             "measured in the driver in the same run.", "",
             "| impl | model | tensors | MiB | load ms | floor ms | µs per tensor | load / floor |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in sorted(mine, key=lambda c: (plots.val(c, "num_tensors"), c["params"]["impl"], c["params"]["pool"])):
        m = c["metrics"]
        n, load, floor = m["num_tensors"]["value"], m["load_cold_s"]["value"], (m.get("metadata_floor_s") or {}).get("value")
        ratio = f"{load / floor:.1f}" if floor else "–"
        lines.append(
            f"| {c['params']['impl']} | {c['params']['model']} | {n:.0f} | {m['model_bytes']['value'] / MiB:.1f} | {load * 1e3:.2f} | "
            f"{'–' if floor is None else f'{floor * 1e3:.2f}'} | {load / n * 1e6:.1f} | {ratio} |"
        )
    return lines + [""]


def ibm_table(cells: list[dict[str, Any]]) -> list[str]:
    """BERT-base load, zero-copy implementations vs a private copy per actor, next to the IBM blog's figures."""
    bert = [c for c in cells if c["params"]["model"] == "bert-base" and "load_cold_s" in c["metrics"]]
    base = [c for c in bert if c["params"]["impl"] == PRIVATE_BASELINE]
    if not base:
        return []

    def load(c: dict[str, Any]) -> float:
        m = c["metrics"]
        return (m.get("load_imported_s") or m.get("load_warm_s") or m["load_cold_s"])["value"]

    private = statistics.median(load(c) for c in base)
    lines = ["## BERT-base load: zero-copy vs a private copy per actor (the IBM table)", "",
             "BERT-base (transformers `BertConfig` defaults, random weights), wrapped once per round of the same run and "
             "loaded in a fresh Ray actor that has already imported transformers (its second load: the first one in a "
             "fresh process spends seconds importing transformers, whatever the implementation; the pool actors' loads, "
             "import included, are in the table above). The blog (IBM, zero-copy model loading with "
             f"Ray) published {IBM_ZERO_COPY_S * 1e3:.1f} ms vs {IBM_PRIVATE_S:.2f} s ({IBM_PRIVATE_S / IBM_ZERO_COPY_S:.0f}x).", "",
             "| impl | load ms | private copy (naive) ms | ratio | blog ratio |", "|---|---|---|---|---|"]  # fmt: skip
    for impl in dict.fromkeys(c["params"]["impl"] for c in bert):
        if impl == PRIVATE_BASELINE:
            continue
        t = statistics.median(load(c) for c in bert if c["params"]["impl"] == impl)
        lines.append(f"| {impl} | {t * 1e3:.1f} | {private * 1e3:.0f} | {private / t:.0f}x | {IBM_PRIVATE_S / IBM_ZERO_COPY_S:.0f}x |")
    return lines + [""]


def notes() -> list[str]:
    return [
        "## How it was measured", "",
        "- One round of a cell is one user's batch job: wrap in the driver (time; clean peak growth: `5` → "
        "/proc/self/clear_refs, then VmHWM), then one run of the shared Ray Data pipeline (`zcbench.suites.pipeline`: "
        "parquet → `map_batches(ActorPoolStrategy(size=pool), num_cpus=0.25)` → parquet). Its pool actors are Ray "
        "Data's own fresh processes; they load concurrently, as a user's job does, and each times the "
        "implementation's `load` call alone, inside the actor (cold: the first load on the driver's node; on other "
        "nodes, in parentheses, the first there; warm: the others). Batches are dispatched once the whole pool has "
        "loaded, so every actor gets its share; the input is one parquet file per block of whole batches.",
        "- Steady state: each actor's calls after its first two (call 0 is the first forward, call 1 the second), "
        "full batches only; at least 20 per actor by the input's size. Throughput is rows/s of the whole pool over "
        "the window in which every actor was past its warm-up and still busy; latency is timed inside `__call__`.",
        "- Memory, the same formula for every implementation (never a sum of RSS): **pool total** = Σ USS of the "
        "pool actors + every file they share counted once (its resident pages, the most any actor maps: the "
        "object store's shared-memory file, a torch-mmap or safetensors checkpoint, shared libraries); **empty "
        "pool** = the same over the same actors just before their load (Python, torch, Ray: each actor's private "
        "runtime, and the shared libraries once); **model costs** = pool total − empty pool, in MiB and in copies "
        "of the model's bytes. Each actor records its shared pages (`/proc/self/smaps`) just before its load, and "
        "its USS and shared pages again when Ray Data retires it after its last batch. The object store's own copy "
        "counts where the actors map it (zero-copy); bytes the store holds that no actor maps (naive's pickled "
        "model) are in the *store MiB* column, not in the pool.",
        "- Store: bytes each node's object store gained (node 0 = the driver's), right after wrap and after the run.",
        "- Audit: every row id exactly once, and a sample of batches re-run in the driver on the original model "
        "(one thread on both sides) and compared bit for bit; any difference makes the cell INVALID.",
        "- Implementations take turns within every round, the order reversing each round (A B, B A, …); ratios "
        "to naive are taken per round, then "
        "summarised. Each implementation group runs in its own measuring process with its `worker_env` set before "
        "`import ray`.",
        "",
    ]  # fmt: skip


def markdown(doc: dict[str, Any], figures: list[str], current_fingerprint: str | None = None) -> str:
    """The report text."""
    stale = stale_reason(doc, current_fingerprint)
    cells = ok_cells(doc)
    lines = header(doc, stale) + verdict_table(doc, stale) + headline(cells)
    lines += ratio_table(cells) + ibm_table(cells) + scale_table(cells) + driver_table(cells) + results_table(cells)
    bad = [c for c in doc["cells"] if c["status"] != "ok" or c["validity"] == "INVALID"]
    if bad:
        lines += ["## Not measured or invalid", ""]
        lines += [f"- `{c['id']}`: {c['status']}/{c['validity']} — {c.get('error') or c.get('audit')}" for c in bad]
        lines.append("")
    lines += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    return "\n".join(lines + notes())


def write_report(doc: dict[str, Any], out_dir: Path, current_fingerprint: str | None = None) -> list[Path]:
    """Write report.md and the PNG plots into ``out_dir``; returns the files written."""
    cells = ok_cells(doc)
    if not cells:
        raise ReportError("no finished (ok) cell in the results: nothing to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plots.write_all(cells, list(dict.fromkeys(c["params"]["impl"] for c in doc["cells"])), out_dir)
    md = out_dir / "report.md"
    schema.write_text_atomic(md, markdown(doc, [str(f) for f in figures], current_fingerprint))
    return [md, *figures]
