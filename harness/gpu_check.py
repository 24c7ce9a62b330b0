"""A short CUDA benchmark: device memory per actor, load time and exact outputs for a pool sharing one GPU.

Run on a GPU machine: ``python -m zcbench.harness.gpu_check --out results/gpu``. Each
implementation loads a ``--mib`` MiB model into ``--actors`` actors of ``1/actors`` GPU
each; CUDA contexts are created before the first load so they are not counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import ray
import torch

from zcbench.suites.cases import blob_case
from zcbench.suites.checks.gpu import GpuLoader
from zcbench.suites.cluster import ensure_ray
from zcbench.suites.compare import first_difference
from zcbench.suites.contract import load_implementation, release

MiB = 2**20


def measure(impl_name: str, mib: int, actors: int) -> dict[str, Any]:
    """Load one model into a pool on one GPU and measure what it cost."""
    impl = load_implementation(impl_name)
    case = blob_case(mib)
    original = case.build()
    model_bytes = sum(p.numel() * p.element_size() for p in original.parameters())
    with torch.no_grad():
        expected = original.to("cuda")(*(x.to("cuda") for x in case.inputs())).cpu()
    del original
    torch.cuda.empty_cache()
    wrapped = impl.wrap(case.build(), "actor")
    options: dict[str, Any] = {"num_gpus": 1 / actors, "num_cpus": 0.01}
    if impl.capabilities.worker_env:
        options["runtime_env"] = {"env_vars": dict(impl.capabilities.worker_env)}
    pool = [GpuLoader.options(**options).remote() for _ in range(actors)]
    try:
        ray.get([a.allocated.remote() for a in pool])  # contexts first
        free_before = torch.cuda.mem_get_info()[0]
        load_s = []
        for a in pool:  # one by one: the first may start a shared owner
            start = time.perf_counter()
            ray.get(a.load.remote(impl.spec, [wrapped], "cuda"))
            load_s.append(time.perf_counter() - start)
        free_after = torch.cuda.mem_get_info()[0]
        allocated = ray.get([a.allocated.remote() for a in pool])
        outputs = ray.get([a.run.remote(case.inputs()) for a in pool])
    finally:
        for a in pool:
            ray.kill(a, no_restart=True)
        release(impl, wrapped)
    differences = [first_difference(o, expected, f"actor {i}") for i, o in enumerate(outputs)]
    growth = free_before - free_after
    return {
        "implementation": impl_name,
        "model_bytes": model_bytes,
        "actors": actors,
        "device_growth_bytes": growth,
        "device_growth_per_actor_bytes": growth / actors,
        "growth_over_model": growth / model_bytes,
        "allocated_per_actor_bytes": allocated,
        "load_s": load_s,
        "outputs_identical": all(d is None for d in differences),
        "first_difference": next((d for d in differences if d), None),
    }


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """A small table of the measurements."""
    lines = [
        f"# GPU check: {machine['gpu']} (torch {machine['torch']}, ray {machine['ray']})",
        "",
        "Device growth = drop of free GPU memory (driver's `mem_get_info`) across all loads, CUDA contexts excluded"
        " except a shared owner's own context, which is counted.",
        "",
        "| implementation | model MiB | actors | device growth MiB | per actor MiB | growth / model | max allocated per actor MiB"
        " | first load s | later loads s (median) | outputs identical |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['implementation']} | error: {r['error'][:120]} ||||||||| |")
            continue
        later = sorted(r["load_s"][1:]) or [float("nan")]
        lines.append(
            f"| {r['implementation']} | {r['model_bytes'] / MiB:.0f} | {r['actors']} | {r['device_growth_bytes'] / MiB:.0f}"
            f" | {r['device_growth_per_actor_bytes'] / MiB:.0f} | {r['growth_over_model']:.2f} | {max(r['allocated_per_actor_bytes']) / MiB:.1f} | {r['load_s'][0]:.2f}"
            f" | {later[len(later) // 2]:.2f} | {r['outputs_identical']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu"))
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--actors", type=int, default=4)
    parser.add_argument("--impl", action="append", help="implementations to measure (default: reference, naive)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device; nothing measured")
        return 2
    ensure_ray()
    machine = {
        "gpu": torch.cuda.get_device_name(0),
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ray": ray.__version__,
        "python": platform.python_version(),
    }
    rows = []
    for name in args.impl or ["reference", "naive"]:
        try:
            rows.append(measure(name, args.mib, args.actors))
        except Exception as exc:  # noqa: BLE001 - one failing implementation must not hide the others
            rows.append({"implementation": name, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(rows[-1]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    (args.out / "gpu_check.md").write_text(markdown(rows, machine))
    print(markdown(rows, machine))
    return 0 if all(r.get("outputs_identical") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
