"""The report's PNG figures (matplotlib, Agg backend: no display needed), one function per figure.

Every function takes the finished cells of a results file and writes one PNG; each
implementation keeps its colour and marker across figures.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from .metrics import NODE_METRIC_PREFIX, is_node_metric

MiB = 2**20


def val(cell: dict[str, Any], name: str) -> float | None:
    """The median value of metric ``name`` in ``cell``, None if absent."""
    m = cell["metrics"].get(name)
    return None if m is None else m["value"]


def series(cells: list[dict[str, Any]], x: str, metric: str) -> dict[str, list[tuple[float, float]]]:
    """impl -> [(x, median of metric over the other axes)], sorted by x (x: a param or a metric name)."""
    acc: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for c in cells:
        v = val(c, metric)
        xv = c["params"].get(x) if x in c["params"] else val(c, x)
        if v is not None and xv is not None:
            acc[c["params"]["impl"]][xv].append(v)
    return {impl: sorted((k, statistics.median(vs)) for k, vs in pts.items()) for impl, pts in acc.items()}


def styles(impls: list[str]) -> dict[str, dict[str, Any]]:
    """A colour and a marker per implementation, stable in the order given."""
    import matplotlib

    markers = "osD^vP*X"
    colors = matplotlib.colormaps["tab10"].colors
    return {n: {"color": colors[i % 10], "marker": markers[i % len(markers)]} for i, n in enumerate(impls)}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def memory_vs_pool(cells: list[dict[str, Any]], model: str, style: dict, path: Path) -> None:
    """Left: what the model costs on top of N empty actors, against the "N copies" and "one copy" lines.
    Right: the pool total and the N empty actors it is measured against."""
    import matplotlib.pyplot as plt

    mine = [c for c in cells if c["params"]["model"] == model]
    pools = sorted({c["params"]["pool"] for c in mine})
    size = statistics.median(val(c, "model_bytes") for c in mine) / MiB
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    ax1.plot(pools, [p * size for p in pools], color="grey", ls="--", label="N copies (one per actor)")
    ax1.plot(pools, [size for _ in pools], color="grey", ls=":", label=f"one copy ({size:.0f} MiB)")
    for impl, pts in series(mine, "pool", "model_cost_bytes").items():
        ax1.plot([p for p, _ in pts], [v / MiB for _, v in pts], label=impl, **style[impl])
    for impl, pts in series(mine, "pool", "pool_total_bytes").items():
        ax2.plot([p for p, _ in pts], [v / MiB for _, v in pts], label=impl, **style[impl])
    empty = series(mine, "pool", "pool_empty_bytes")
    if empty:
        by_pool: dict[float, list[float]] = defaultdict(list)
        for pts in empty.values():
            for p, v in pts:
                by_pool[p].append(v)
        xs = sorted(by_pool)
        ax2.plot(xs, [statistics.median(by_pool[p]) / MiB for p in xs], color="black", ls="--", label="N empty actors")
    ax1.set(title=f"{model}: what the model costs on top of N empty actors", xlabel="actors in pool", ylabel="MiB",
            xticks=pools, ylim=(0, None))  # fmt: skip
    ax2.set(title=f"{model}: pool total (ΣUSS + shared files once)", xlabel="actors in pool", ylabel="MiB",
            xticks=pools, ylim=(0, None))  # fmt: skip
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def throughput_vs_batch(cells: list[dict[str, Any]], model: str, style: dict, path: Path) -> None:
    """Steady-state throughput vs batch size, one panel per pool size, IQR over rounds as error bars."""
    import matplotlib.pyplot as plt

    mine = [c for c in cells if c["params"]["model"] == model and "throughput_rows_s" in c["metrics"]]
    pools = sorted({c["params"]["pool"] for c in mine})
    fig, axes = plt.subplots(1, len(pools), figsize=(4.2 * len(pools), 4), squeeze=False, sharey=True)
    batches = sorted({c["params"]["batch"] for c in mine})
    for ax, pool in zip(axes[0], pools):
        by_impl: dict[str, list[dict]] = defaultdict(list)
        for c in mine:
            if c["params"]["pool"] == pool:
                by_impl[c["params"]["impl"]].append(c)
        for impl, cs in by_impl.items():
            cs.sort(key=lambda c: c["params"]["batch"])
            ms = [c["metrics"]["throughput_rows_s"] for c in cs]
            ys = [m["value"] for m in ms]
            lo = [m["value"] - m.get("stats", {}).get("q1", m["value"]) for m in ms]
            hi = [m.get("stats", {}).get("q3", m["value"]) - m["value"] for m in ms]
            ax.errorbar([c["params"]["batch"] for c in cs], ys, yerr=[lo, hi], label=impl, capsize=3, **style[impl])
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set(title=f"pool = {pool}", xlabel="batch size")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("steady rows/s (median, IQR bars)")
    axes[0][0].set_ylim(bottom=0)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{model}: Ray Data pipeline, steady state")
    _save(fig, path)


def load_vs_model_size(cells: list[dict[str, Any]], style: dict, path: Path) -> None:
    """Cold and warm load time in the pool actors vs model size, one line per implementation."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for metric, ls, fill, tag in (("load_cold_s", "-", None, "cold"), ("load_warm_s", ":", "none", "warm")):
        for impl, pts in series(cells, "model_bytes", metric).items():
            ax.plot([x / MiB for x, _ in pts], [v * 1000 for _, v in pts], ls=ls, mfc=fill, ms=8, label=f"{impl} ({tag})",
                    **style[impl])  # fmt: skip
    ax.set(title="Load time in a pool actor vs model size", xlabel="model size (MiB)", ylabel="load time (ms)", ylim=(0, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def scale_cells(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cells that can go on the scaling plots: a load time and a tensor count, for models of two or more shapes."""
    mine = [c for c in cells if val(c, "load_cold_s") is not None and val(c, "num_tensors")]
    return mine if len({c["params"]["model"] for c in mine}) >= 2 else []


def load_scaling(cells: list[dict[str, Any]], style: dict, x: str, path: Path) -> None:
    """Log-log load time (the first load on the driver's node) vs ``x`` (``num_tensors`` or ``model_bytes``),
    every implementation a line, and the metadata floor measured in the same run."""
    import matplotlib.pyplot as plt

    mine = scale_cells(cells)
    fig, ax = plt.subplots(figsize=(7, 4.4))
    scale = 1 if x == "num_tensors" else 1 / MiB
    for impl, pts in series(mine, x, "load_cold_s").items():
        ax.plot([a * scale for a, _ in pts], [v * 1000 for _, v in pts], label=impl, **style[impl])
    floor: dict[float, list[float]] = defaultdict(list)
    for pts in series(mine, x, "metadata_floor_s").values():
        for a, v in pts:
            floor[a].append(v)
    if floor:
        xs = sorted(floor)
        ax.plot([a * scale for a in xs], [min(floor[a]) * 1000 for a in xs], color="black", ls="--", marker="_", ms=14,
                label="metadata floor (views + Parameters)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    what = "tensors in the model" if x == "num_tensors" else "model size (MiB)"
    ax.set(title=f"Load time vs {what.split(' (')[0]} (log-log)", xlabel=f"{what} (log)", ylabel="load time (ms, log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    _save(fig, path)


def node_metrics(cell: dict[str, Any]) -> dict[int, float]:
    """``{node index: store bytes gained}`` of a cell."""
    n = len(NODE_METRIC_PREFIX)
    return {int(k[n:]): m["value"] for k, m in cell["metrics"].items() if is_node_metric(k)}


def store_per_node(cells: list[dict[str, Any]], style: dict, path: Path) -> None:
    """Object store bytes each node gained, one bar per implementation, one panel per model (its largest pool),
    with the model size as the one-copy-per-node reference."""
    import matplotlib.pyplot as plt

    mine = [c for c in cells if node_metrics(c)]
    model_names = list(dict.fromkeys(c["params"]["model"] for c in mine))
    fig, axes = plt.subplots(1, len(model_names), figsize=(max(5.5, 4.5 * len(model_names)), 4.2), squeeze=False)
    for ax, model in zip(axes[0], model_names):
        of_model = [c for c in mine if c["params"]["model"] == model]
        pool = max(c["params"]["pool"] for c in of_model)
        by_impl: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for c in of_model:
            if c["params"]["pool"] == pool:
                for node, v in node_metrics(c).items():
                    by_impl[c["params"]["impl"]][node].append(v)
        nodes = sorted({n for per in by_impl.values() for n in per})
        width = 0.8 / max(1, len(by_impl))
        for j, (impl, per) in enumerate(by_impl.items()):
            xs = [i + (j - (len(by_impl) - 1) / 2) * width for i in range(len(nodes))]
            ax.bar(xs, [statistics.median(per[n]) / MiB if per.get(n) else 0.0 for n in nodes], width=width,
                   color=style[impl]["color"], label=impl)  # fmt: skip
        size = statistics.median(val(c, "model_bytes") for c in of_model) / MiB
        ax.axhline(size, color="grey", ls="--", label=f"one copy per node ({size:.1f} MiB)")
        ax.set_xticks(range(len(nodes)), [f"node {n}" + (" (driver)" if n == 0 else "") for n in nodes])
        ax.set(title=f"{model}, pool {pool}", ylabel="object store MiB added", ylim=(0, None))
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.suptitle("Object store bytes per node")
    _save(fig, path)


def write_all(cells: list[dict[str, Any]], impls: list[str], out_dir: Path) -> list[Path]:
    """Every figure the cells support, into ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    style = styles(impls)
    paths: list[Path] = []
    for model in dict.fromkeys(c["params"]["model"] for c in cells):
        slug = model.replace("/", "_")
        mine = [c for c in cells if c["params"]["model"] == model]
        if any(val(c, "model_cost_bytes") is not None for c in mine):
            paths.append(out_dir / f"memory_vs_pool_{slug}.png")
            memory_vs_pool(cells, model, style, paths[-1])
        if any(val(c, "throughput_rows_s") is not None for c in mine):
            paths.append(out_dir / f"throughput_vs_batch_{slug}.png")
            throughput_vs_batch(cells, model, style, paths[-1])
    paths.append(out_dir / "load_vs_model_size.png")
    load_vs_model_size(cells, style, paths[-1])
    if scale_cells(cells):
        for x, name in (("num_tensors", "load_vs_tensor_count.png"), ("model_bytes", "load_vs_bytes.png")):
            paths.append(out_dir / name)
            load_scaling(cells, style, x, paths[-1])
    if any(node_metrics(c) for c in cells) and any(val(c, "num_nodes") and val(c, "num_nodes") > 1 for c in cells):
        paths.append(out_dir / "store_bytes_per_node.png")
        store_per_node(cells, style, paths[-1])
    return paths
