"""How long a benchmark run will take, printed before a long one starts (``zcbench main --full``).

A cost model in CPU-seconds, calibrated on this 2-core machine class from the CPU time of
real rounds (the driver and every Ray process it started, psutil), divided by the cores
the run keeps busy. It is an estimate for planning, not a measurement: the report gives
the real wall time.
"""

from __future__ import annotations

import math
import re

from .matrix import Settings, cell_keys, rows_for

#: A fresh pool actor, its batches aside: a Ray worker that imports Ray Data and torch, loads, records its memory
#: (measured 3.7 CPU-s up to its load and 5.4 in all on this machine class while other jobs ran).
ACTOR_CPU_S = 4.5
#: Per round besides the actors: wrap, the pipeline's report actor, Ray Data's read and write tasks, the audit.
ROUND_CPU_S = 5.0
#: Per measuring process: imports, a private cluster's start and Ray Data's own system actors.
PROCESS_CPU_S = 15.0
#: Cores a run keeps busy on a 2-core machine (the pool and Ray's own processes overlap imperfectly).
BUSY_CORES = 1.7
#: One pass over the weights per batch, plus a multiply-add per weight and row (mlp-256mib: 21 ms at batch 1,
#: 53 ms at batch 8, one thread).
FLOPS_PER_S = 40e9
BYTES_PER_S = 12e9
_MIB = re.compile(r"^mlp-(\d+)mib$")
_TENSORS = re.compile(r"^tensors-(\d+)$")
#: Approximate weight bytes of the named models the regexes do not cover.
NAMED_BYTES = {
    "wide-384mib": 384 * 2**20, "linears-2000": 33 * 2**20, "bert-base": 418 * 2**20, "mixed": 10 * 2**20,
    "gpt2-small-config": 20 * 2**20, "bert-small-config": 20 * 2**20, "minilm-l6-v2-pretrained": 87 * 2**20,
}  # fmt: skip


def model_bytes(name: str) -> int:
    """Approximate weight bytes of a model name (no model is built)."""
    if m := _MIB.match(name):
        return int(m.group(1)) * 2**20
    if m := _TENSORS.match(name):
        return int(m.group(1)) * 4096
    return NAMED_BYTES.get(name, 64 * 2**20)


def batch_cpu_s(name: str, batch: int) -> float:
    """CPU-seconds of one forward pass of ``batch`` rows."""
    size = model_bytes(name)
    return size / BYTES_PER_S + 2 * (size / 4) * batch / FLOPS_PER_S


def round_cpu_s(settings: Settings, model: str, pool: int, batch: int) -> float:
    """CPU-seconds of one round of one cell."""
    plan = rows_for(settings, pool, batch)
    batches = math.ceil(plan.rows / batch) + settings.audit_batches  # the pool's batches and the driver's audit
    return pool * ACTOR_CPU_S + batches * batch_cpu_s(model, batch) + ROUND_CPU_S


def run_seconds(settings: Settings, processes: int = 1, cells: list[dict] | None = None) -> float:
    """Expected wall seconds on an idle 2-core machine of ``cells`` (params dicts; default: the whole matrix,
    every implementation) plus starting ``processes`` measuring processes."""
    if cells is None:
        cells = [{"impl": i, **key} for key in cell_keys(settings) for i in settings.impls]
    rounds = settings.rounds + settings.warmup
    cpu = processes * PROCESS_CPU_S
    cpu += sum(rounds * round_cpu_s(settings, c["model"], c["pool"], c["batch"]) for c in cells)
    return cpu / BUSY_CORES


#: One implementation's conformance run (CI profile) on this machine class, in seconds (measured 86-89 s).
CONFORMANCE_S = 88.0
#: Two runs at a time take this much longer than one: both are CPU-bound (measured 166 s for two, 86 s for one).
CONCURRENT_SLOWDOWN = 1.9


def conformance_seconds(impls: int, jobs: int = 1) -> float:
    """Expected wall time of conformance runs of ``impls`` implementations, ``jobs`` at a time."""
    if impls <= 0:
        return 0.0
    jobs = max(1, min(jobs, impls))
    return CONFORMANCE_S * math.ceil(impls / jobs) * (CONCURRENT_SLOWDOWN if jobs > 1 else 1.0)


def clock(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds} s"
