"""Markdown report and PNG plots of a results file (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

MiB = 2**20


class ReportError(ValueError):
    """Nothing to report (no finished cell)."""


def _ok(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in doc["cells"] if c["status"] == "ok"]


def _val(cell: dict[str, Any], name: str) -> float | None:
    m = cell["metrics"].get(name)
    return None if m is None else m["value"]


def _series(cells: list[dict[str, Any]], x: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """impl -> [(x, median of metric over the other axes)], sorted by x."""
    acc: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        v = _val(c, metric)
        if v is not None:
            xv = c["params"].get(x) if x in c["params"] else _val(c, x)
            acc[c["params"]["impl"]][xv].append(v)
    return {impl: sorted((k, statistics.median(vs)) for k, vs in pts.items()) for impl, pts in acc.items()}


def verdicts(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per implementation: counts by status and VALID/INVALID (INVALID if any audited cell failed its audit)."""
    out: dict[str, dict[str, Any]] = {}
    for c in doc["cells"]:
        v = out.setdefault(c["params"]["impl"], {"ok": 0, "failed": 0, "skipped": 0, "missing": 0, "invalid": 0})
        v[c["status"]] += 1
        v["invalid"] += c["validity"] == "INVALID"
    for v in out.values():
        v["verdict"] = "INVALID" if v["invalid"] else ("VALID" if v["ok"] else "NO DATA")
    return out


def _impl_styles(impls: list[str]) -> dict[str, dict[str, Any]]:
    markers = "osD^vP*X"
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    return {n: {"color": colors[i % 10], "marker": markers[i % len(markers)]} for i, n in enumerate(impls)}


def plot_memory(cells: list[dict[str, Any]], model: str, styles: dict, path: Path) -> None:
    """Per-actor USS and total pool memory vs pool size, with the one-copy-per-actor reference."""
    import matplotlib.pyplot as plt

    mine = [c for c in cells if c["params"]["model"] == model]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    pools = sorted({c["params"]["pool"] for c in mine})
    size = statistics.median(_val(c, "model_bytes") for c in mine) / MiB
    for impl, pts in _series(mine, "pool", "actor_uss_infer_bytes").items():
        ax1.plot([p for p, _ in pts], [v / MiB for _, v in pts], label=impl, **styles[impl])
    for impl, pts in _series(mine, "pool", "pool_total_bytes").items():
        ax2.plot([p for p, _ in pts], [v / MiB for _, v in pts], label=impl, **styles[impl])
    ax1.axhline(size, color="grey", ls="--", label=f"model size ({size:.0f} MiB)")
    ax2.plot(pools, [p * size for p in pools], color="grey", ls="--", marker="_", ms=16, label="one copy per actor (pool × model)")
    ax1.set(title=f"{model}: private memory (USS) per actor", xlabel="actors in pool", ylabel="MiB", xticks=pools, ylim=(0, None))
    ax2.set(title=f"{model}: pool total = ΣUSS + shared store once", xlabel="actors in pool", ylabel="MiB", xticks=pools, ylim=(0, None))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(cells: list[dict[str, Any]], styles: dict, path: Path) -> None:
    """Cold and warm load time vs model size, one line per implementation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for metric, ls, fill, tag in (("load_cold_s", "-", None, "cold"), ("load_warm_s", ":", "none", "warm")):
        for impl, pts in _series(cells, "model_bytes", metric).items():
            ax.plot([x / MiB for x, _ in pts], [v * 1000 for _, v in pts], ls=ls, mfc=fill, ms=8, label=f"{impl} ({tag})", **styles[impl])
    ax.set(title="Load time in a fresh actor vs model size", xlabel="model size (MiB)", ylabel="load time (ms)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tensor_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for c in cells if c["params"]["model"].startswith("tensors-") and "num_tensors" in c["metrics"]]


def plot_load_vs_tensors(cells: list[dict[str, Any]], styles: dict, path: Path) -> None:
    """Cold and warm load time vs number of tensors (log x), one line per implementation."""
    import matplotlib.pyplot as plt

    mine = _tensor_cells(cells)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for metric, ls, fill, tag in (("load_cold_s", "-", None, "cold"), ("load_warm_s", ":", "none", "warm")):
        for impl, pts in _series(mine, "num_tensors", metric).items():
            ax.plot([x for x, _ in pts], [v * 1000 for _, v in pts], ls=ls, mfc=fill, ms=8, label=f"{impl} ({tag})", **styles[impl])
    counts = sorted({int(_val(c, "num_tensors")) for c in mine})
    ax.set_xscale("log")
    ax.set_xticks(counts, [str(n) for n in counts])
    ax.set(title="Load time in a fresh actor vs number of tensors (4 KiB each)", xlabel="tensors in the model (log scale)",
           ylabel="load time (ms)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _node_metrics(cell: dict[str, Any]) -> dict[int, float]:
    from .cells import NODE_METRIC_PREFIX

    n = len(NODE_METRIC_PREFIX)
    return {int(k[n:]): m["value"] for k, m in cell["metrics"].items() if k.startswith(NODE_METRIC_PREFIX) and k[n:].isdigit()}


def plot_store_per_node(cells: list[dict[str, Any]], styles: dict, path: Path) -> None:
    """Object store bytes each node gained, grouped by node, one bar per implementation; one panel per model
    (largest pool of that model), with the model size as the one-copy-per-node reference."""
    import matplotlib.pyplot as plt

    mine = [c for c in cells if _node_metrics(c)]
    models = list(dict.fromkeys(c["params"]["model"] for c in mine))
    fig, axes = plt.subplots(1, len(models), figsize=(max(5.5, 4.5 * len(models)), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        of_model = [c for c in mine if c["params"]["model"] == model]
        pool = max(c["params"]["pool"] for c in of_model)
        by_impl: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in of_model:
            if c["params"]["pool"] == pool:
                for node, v in _node_metrics(c).items():
                    by_impl[c["params"]["impl"]][node].append(v)
        nodes = sorted({n for per in by_impl.values() for n in per})
        width = 0.8 / max(1, len(by_impl))
        for j, (impl, per) in enumerate(by_impl.items()):
            xs = [i + (j - (len(by_impl) - 1) / 2) * width for i in range(len(nodes))]
            ys = [statistics.median(per[n]) / MiB if per.get(n) else 0.0 for n in nodes]
            ax.bar(xs, ys, width=width, color=styles[impl]["color"], label=impl)
        size = statistics.median(_val(c, "model_bytes") for c in of_model) / MiB
        ax.axhline(size, color="grey", ls="--", label=f"one copy per node ({size:.1f} MiB)")
        ax.set_xticks(range(len(nodes)), [f"node {n}" + (" (driver)" if n == 0 else "") for n in nodes])
        ax.set(title=f"{model}, pool {pool}", ylabel="object store MiB added", ylim=(0, None))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.suptitle("Object store bytes per node")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(cells: list[dict[str, Any]], model: str, styles: dict, path: Path) -> None:
    """Steady throughput vs batch size, one panel per pool size, IQR as error bars."""
    import matplotlib.pyplot as plt

    mine = [c for c in cells if c["params"]["model"] == model and "throughput_rows_s" in c["metrics"]]
    pools = sorted({c["params"]["pool"] for c in mine})
    fig, axes = plt.subplots(1, len(pools), figsize=(4.2 * len(pools), 4), squeeze=False, sharey=True)
    for ax, pool in zip(axes[0], pools):
        by_impl: dict[str, list[dict]] = defaultdict(list)
        for c in mine:
            if c["params"]["pool"] == pool:
                by_impl[c["params"]["impl"]].append(c)
        for impl, cs in by_impl.items():
            cs.sort(key=lambda c: c["params"]["batch"])
            xs = [c["params"]["batch"] for c in cs]
            ms = [c["metrics"]["throughput_rows_s"] for c in cs]
            ys = [m["value"] for m in ms]
            lo = [m["value"] - m.get("stats", {}).get("q1", m["value"]) for m in ms]
            hi = [m.get("stats", {}).get("q3", m["value"]) - m["value"] for m in ms]
            ax.errorbar(xs, ys, yerr=[lo, hi], label=impl, capsize=3, **styles[impl])
        ax.set_xscale("log", base=2)
        batches = sorted({c["params"]["batch"] for c in mine})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(title=f"pool = {pool}", xlabel="batch size")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("rows/s (median, IQR bars)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{model}: Ray Data pipeline throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(m: dict[str, Any] | None, scale: float = 1.0, digits: int = 0, spread: bool = True) -> str:
    if m is None:
        return "–"
    text = f"{m['value'] / scale:.{digits}f}"
    st = m.get("stats")
    if spread and st and st["n"] > 1:
        text += f" ±{st['iqr'] / scale / 2:.{digits}f}"
    return text


def _remote(m: dict[str, Any]) -> str:
    return f" (other nodes {_fmt(m['load_cold_remote_s'], 1e-3, 1)})" if "load_cold_remote_s" in m else ""


def markdown(doc: dict[str, Any], figures: list[str]) -> str:
    """The report text: context, verdicts, one results table, failures, figures, method notes."""
    mach, s = doc["machine"], doc["settings"]
    lines = [
        f"# zcbench benchmark report — run `{doc['run_id'][:12]}`",
        "",
        f"Started {doc['created']}; wall time {doc.get('wall_s', 0):.0f} s; "
        f"{'complete' if doc['complete'] else 'INCOMPLETE (resume with zcbench run --resume)'}.",
        "",
        f"- Machine: {mach['cpu_model']}, {mach['cores_physical']} cores / {mach['cores_logical']} threads, "
        f"{mach['ram_bytes'] / 2**30:.1f} GiB RAM, GPU: {', '.join(mach.get('gpus') or []) or 'none'}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()),
        f"- Commit: `{doc['commit'].get('sha')}`{' (uncommitted changes)' if doc['commit'].get('dirty') else ''}",
        f"- Settings: rounds {s['rounds']} (+{s['warmup']} warm-up), rows {s.get('rows')}, seed {s['seed']}, "
        f"models {', '.join(s['models'])}, pools {s['pools']}, batches {s['batches']}, devices {s['devices']}",
        "- Cluster: " + (f"existing, at {s['ray_address']}" if s.get("ray_address") else
                         f"private, {s.get('nodes', 1)} simulated node(s) on this host, each with its own object store"
                         if s.get("nodes", 1) > 1 else "private, one local node"),
        "",
        "## Verdict per implementation",
        "",
        "| implementation | version | verdict | ok | failed | skipped | missing |",
        "|---|---|---|---|---|---|---|",
    ]
    versions = {i["name"]: i["version"] for i in doc["implementations"]}
    for impl, v in verdicts(doc).items():
        lines.append(f"| {impl} | {versions.get(impl, '?')} | **{v['verdict']}** | {v['ok']} | {v['failed']} | {v['skipped']} | {v['missing']} |")
    lines += [
        "",
        "VALID: every audited pipeline batch equals the original model's outputs bit for bit.",
        "",
        "## Results (median ± IQR/2 over rounds)",
        "",
        "| impl | model | dev | pool | batch | load cold ms | load warm ms | 1st fwd ms | USS/actor MiB | pool total MiB | store MiB | rows/s | busy actors | p50 ms | p99 ms | vs naive | audit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted(_ok(doc), key=lambda c: (c["params"]["model"], c["params"]["device"], c["params"]["pool"], c["params"]["batch"], c["params"]["impl"])):
        p, m = c["params"], c["metrics"]
        lines.append(
            f"| {p['impl']} | {p['model']} | {p['device']} | {p['pool']} | {p['batch']} | "
            f"{_fmt(m.get('load_cold_s'), 1e-3, 1)}{_remote(m)} | {_fmt(m.get('load_warm_s'), 1e-3, 1)} | {_fmt(m.get('first_forward_s'), 1e-3, 1)} | "
            f"{_fmt(m.get('actor_uss_infer_bytes'), MiB)} | {_fmt(m.get('pool_total_bytes'), MiB)} | {_fmt(m.get('store_bytes'), MiB, spread=False)} | "
            f"{_fmt(m.get('throughput_rows_s'))} | {_fmt(m.get('pipeline_actors'), spread=False)} | {_fmt(m.get('latency_p50_s'), 1e-3, 1)} | {_fmt(m.get('latency_p99_s'), 1e-3, 1)} | "
            f"{_fmt(m.get('throughput_vs_naive'), digits=2, spread=False)} | {c['validity']} |"
        )
    bad = [c for c in doc["cells"] if c["status"] != "ok" or c["validity"] == "INVALID"]
    if bad:
        lines += ["", "## Not measured or invalid", ""]
        lines += [f"- `{c['id']}`: {c['status']}/{c['validity']} — {c.get('error') or c.get('audit')}" for c in bad]
    lines += ["", "## Figures", ""]
    lines += [f"![{Path(f).stem}]({Path(f).name})" for f in figures]
    lines += [
        "",
        "## How it was measured",
        "",
        "- Each round of a cell: wrap in the driver (time; clean peak growth: `5` → /proc/self/clear_refs, then VmHWM);"
        " load in fresh Ray actors spread round-robin over the nodes (cold = first on the driver's node; with several nodes, in parentheses, the first on each other node, which also waits for the bytes to reach its store; warm = the next ones); first forward pass on one batch;"
        " USS/PSS per actor from psutil/smaps after load and after inference; the node's object store bytes from the raylet.",
        "- Scale: `tensors-<N>` models hold N parameters of 4 KiB (load time vs tensor count); `store_bytes_node<i>`"
        " is what each node's object store gained by the time the pool had loaded (node 0 = the driver's node; asked"
        " of every alive raylet), `num_nodes` the cluster's alive nodes.",
        "- Pool total = Σ per-actor USS + object-store bytes the model added, counted once (never ΣRSS).",
        "- Throughput: the seed's Ray Data pipeline, parquet in → map_batches(ActorPoolStrategy(size=pool), fractional"
        " num_cpus) → parquet out; rows/s between the first batch's start and the last batch's end inside the actors."
        " Latency p50/p99 timed inside `__call__` (each actor's first call excluded).",
        "- Audit: each pool actor's first batch — its first rows are compared with the original model on the same batch"
        " (one thread on both sides), bit for bit.",
        "- Implementations take turns within every round (A B A B …). Each implementation group runs in its own measuring"
        " process with its capabilities.worker_env set before `import ray` (Ray's built-in zero-copy reads"
        " RAY_ENABLE_ZERO_COPY_TORCH_TENSORS at import).",
    ]
    return "\n".join(lines) + "\n"


def write_report(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.md and the PNG plots into ``out_dir``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    cells = _ok(doc)
    if not cells:
        raise ReportError("no finished (ok) cell in the results: nothing to report")
    out_dir.mkdir(parents=True, exist_ok=True)
    styles = _impl_styles(list(dict.fromkeys(c["params"]["impl"] for c in doc["cells"])))
    figures: list[Path] = []
    for model in dict.fromkeys(c["params"]["model"] for c in cells):
        slug = model.replace("/", "_")
        p = out_dir / f"memory_vs_pool_{slug}.png"
        plot_memory(cells, model, styles, p)
        figures.append(p)
        p = out_dir / f"throughput_vs_batch_{slug}.png"
        plot_throughput(cells, model, styles, p)
        figures.append(p)
    p = out_dir / "load_vs_model_size.png"
    plot_load(cells, styles, p)
    figures.append(p)
    if _tensor_cells(cells):
        p = out_dir / "load_vs_tensor_count.png"
        plot_load_vs_tensors(cells, styles, p)
        figures.append(p)
    if any(_node_metrics(c) for c in cells):
        p = out_dir / "store_bytes_per_node.png"
        plot_store_per_node(cells, styles, p)
        figures.append(p)
    md = out_dir / "report.md"
    md.write_text(markdown(doc, [str(f) for f in figures]))
    return [md, *figures]
