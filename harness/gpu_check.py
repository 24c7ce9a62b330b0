"""The CUDA check: what sharing one model across a pool of 4 actors on one GPU costs, and whether it is right.

Measured for each implementation (default: the reference and the private-copy
baseline ``naive``), in one pool of 4 actors with ``num_gpus=0.25`` each:

* VRAM per process after loading a 12-tensor fp32 model: ``torch.cuda.memory_allocated``
  in each actor and NVML per process (nvidia-ml-py, else ``nvidia-smi``), the GPU
  owner process if the implementation has one, and the growth of the device's used memory;
* load time per actor for 12 and for 5,000 tensors (the first load may start an owner);
* exact outputs (bit-identical to the original on the same GPU) of that model and of a
  bf16 model with tied weights, and whether the ties survive in every actor;
* the write policy an in-place write reveals, against the declared ``cuda_write_policy``;
* the reference only: a GPU owner killed while the weights are still in the object
  store is replaced (exact outputs), and killed after the weights are gone gives
  ``ModelLostError``;
* memory released when the last consumer ends: no process but the driver and the
  idle actors left on the GPU, used memory back to where it was before the loads.

``python -m zcbench.harness.gpu_check --out DIR`` writes ``gpu_check.json`` (rewritten
after every phase, so a killed run keeps what it measured) and ``gpu_check.md``. Without
CUDA it measures nothing unless ``--device cpu`` (the same scenarios on the CPU, small
models, GPU memory readings n/a: the dry run of the mechanics) or ``--allow-no-cuda``
(report "skipped", exit 0). The decisions are pure functions, tested without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn

from zcbench.suites.checks.gpu import classify_write, judge_write
from zcbench.suites.contract import load_implementation, release

MiB = 2**20
POOL = 4
#: The reference names its GPU owner actors ``zc-gpu-owner:<node>:<gpu>:<object>``.
OWNER_PREFIX = "zc-gpu-owner:"
#: An actor that maps another process's weights allocates at most this much itself.
SMALL_ALLOC = 16 * MiB
#: The device may hold the model this many times over once (allocator rounding).
ONE_COPY_SLACK = 1.25
#: Used memory may stay this far above where it was before the loads once everything ended.
RELEASE_SLACK = 128 * MiB
#: The reference reaps a dead consumer's lease within 5 s; the owner then frees and exits.
RELEASE_TIMEOUT_S = 40.0
LOAD_TIMEOUT_S = 90.0
LOST_TIMEOUT_S = 30.0
#: Kept back for each implementation still to measure (a baseline's pool takes about 20 s on the device).
PER_BASELINE_S = 35.0
#: Object store of the private cluster: the 384 MiB model, the baseline's pickled copy, the small ones.
STORE_BYTES = 2 * 2**30
STATUSES = ("ok", "partial", "skipped", "failed")


@dataclass(frozen=True)
class Sizes:
    """Model sizes: a ``big_layers``-layer chain of width ``big_width`` (2 tensors a layer), and a 5,000-tensor chain."""

    big_width: int = 4096
    big_layers: int = 6
    many_width: int = 16
    many_layers: int = 2500
    batch: int = 8


GPU_SIZES = Sizes()
CPU_SIZES = Sizes(big_width=512)


# --- models (deterministic: the driver and a maker actor build the same bytes) ------------


class Chain(nn.Module):
    """``layers`` Linear layers with tanh between them: 2 tensors a layer, fp32."""

    def __init__(self, width: int, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class TiedBf16(nn.Module):
    """An embedding tied to the output head (fp32) around a bf16 layer; returns both dtypes."""

    def __init__(self, vocab: int = 1024, dim: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.mid = nn.Linear(dim, dim).to(torch.bfloat16)

    def forward(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = self.mid(self.embed(ids).to(torch.bfloat16))
        return {"logits": self.head(hidden.float()), "hidden_bf16": hidden}


MODELS = ("big12", "exact", "many5000")


def build(name: str, sizes: Sizes) -> nn.Module:
    """One of :data:`MODELS`, with seeded weights, in eval mode."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")
    torch.manual_seed(MODELS.index(name) + 1)
    if name == "big12":
        model: nn.Module = Chain(sizes.big_width, sizes.big_layers)
    elif name == "many5000":
        model = Chain(sizes.many_width, sizes.many_layers)
    else:
        model = TiedBf16()
    return model.eval()


def inputs(name: str, sizes: Sizes) -> tuple[torch.Tensor, ...]:
    """The CPU inputs of one model (seeded)."""
    gen = torch.Generator().manual_seed(1)
    if name == "exact":
        return (torch.randint(0, 1024, (sizes.batch, 16), generator=gen),)
    width = sizes.big_width if name == "big12" else sizes.many_width
    return (torch.randn(sizes.batch, width, generator=gen),)


def tensor_count(model: nn.Module) -> int:
    """Parameters and buffers (a tied weight counts once)."""
    return len({id(t) for t in [*model.parameters(), *model.buffers()]})


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the unique storages behind the model's tensors."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def first_difference(got: Any, expected: Any, path: str = "output") -> str | None:
    """None when bit-identical (dtype and shape included), else where the first difference is."""
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path}: {type(got).__name__}, expected a tensor"
        if got.dtype != expected.dtype or got.shape != expected.shape:
            return f"{path}: {got.dtype}{tuple(got.shape)}, expected {expected.dtype}{tuple(expected.shape)}"
        if not torch.equal(got.cpu(), expected.cpu()):
            return f"{path}: values differ in {int((got.cpu() != expected.cpu()).sum())} elements"
        return None
    if isinstance(expected, Mapping):
        if not isinstance(got, Mapping) or list(got) != list(expected):
            return f"{path}: keys {list(got) if isinstance(got, Mapping) else type(got).__name__}, expected {list(expected)}"
        return next((d for k in expected if (d := first_difference(got[k], expected[k], f"{path}[{k!r}]"))), None)
    return None if got == expected else f"{path}: {got!r}, expected {expected!r}"


def _to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if isinstance(out, Mapping):
        return {k: _to_cpu(v) for k, v in out.items()}
    return out


# --- GPU memory readings -------------------------------------------------------------------


def parse_compute_apps(text: str) -> dict[int, int | None]:
    """``nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits`` → bytes per pid (None: n/a)."""
    out: dict[int, int | None] = {}
    for line in text.strip().splitlines():
        pid, _, used = (p.strip() for p in line.partition(","))
        if pid.isdigit():
            out[int(pid)] = int(float(used) * MiB) if used.replace(".", "", 1).isdigit() else None
    return out


def parse_used(text: str) -> int | None:
    """``nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits`` (first GPU, MiB) → bytes."""
    first = text.strip().splitlines()[0].strip() if text.strip() else ""
    return int(float(first) * MiB) if first.replace(".", "", 1).isdigit() else None


class GpuMemory:
    """Per-process and device-wide used memory of GPU 0: NVML when nvidia-ml-py imports, else nvidia-smi, else nothing."""

    def __init__(self, index: int = 0, enabled: bool = True):
        self.source = "none"
        self._nvml: Any = None
        self._index = index
        if not enabled:  # the CPU dry run: every reading is n/a
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self.source = "nvml"
        except Exception:  # noqa: BLE001 - no nvidia-ml-py or no driver: try the command
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"

    def processes(self) -> dict[int, int | None] | None:
        """Used bytes per process id on the GPU (None: not readable here)."""
        try:
            if self._nvml is not None:
                procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                return {p.pid: (p.usedGpuMemory if isinstance(p.usedGpuMemory, int) else None) for p in procs}
            if self.source == "nvidia-smi":
                return parse_compute_apps(self._smi("--query-compute-apps=pid,used_memory"))
        except Exception:  # noqa: BLE001 - a reading we cannot take is reported as n/a
            return None
        return None

    def used(self) -> int | None:
        """Used bytes of the whole GPU."""
        try:
            if self._nvml is not None:
                return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
            if self.source == "nvidia-smi":
                return parse_used(self._smi("--query-gpu=memory.used"))
        except Exception:  # noqa: BLE001
            return None
        return None

    def _smi(self, query: str) -> str:
        return subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits", f"--id={self._index}"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout


# --- decisions (pure: tested with fabricated numbers) --------------------------------------


def one_copy_problem(
    model_bytes: int,
    consumer_allocated: list[int],
    owner_allocated: int | None,
    growth: int | None,
    context_bytes: int | None,
    slack: float = ONE_COPY_SLACK,
) -> str | None:
    """None when the GPU holds the model once for the whole pool; else why not.

    Consumers must allocate (almost) nothing; an owner process, if any, holds about one
    model; the device's used memory grows by at most ``slack`` models plus one CUDA
    context (the owner's own, measured as a fresh actor's).
    """
    big = [i for i, a in enumerate(consumer_allocated) if a > SMALL_ALLOC]
    if big:
        return (f"{len(big)} of {len(consumer_allocated)} actors allocated their own copy "
                f"({max(consumer_allocated) / MiB:.0f} MiB at most, model {model_bytes / MiB:.0f} MiB)")
    if owner_allocated is not None and not model_bytes <= owner_allocated <= slack * model_bytes:
        return f"the owner holds {owner_allocated / MiB:.0f} MiB for a {model_bytes / MiB:.0f} MiB model"
    if growth is not None:
        extra = growth - (context_bytes or 0)
        if extra > slack * model_bytes:
            return (f"device memory grew by {growth / MiB:.0f} MiB ({(context_bytes or 0) / MiB:.0f} MiB of it one context) "
                    f"for {len(consumer_allocated)} actors of a {model_bytes / MiB:.0f} MiB model")
    return None


def private_copies_problem(model_bytes: int, consumer_allocated: list[int]) -> str | None:
    """None when every actor of the baseline holds its own copy (else the baseline does not measure what it should)."""
    short = [a for a in consumer_allocated if a < 0.95 * model_bytes]
    if short:
        return f"{len(short)} baseline actors hold less than the model ({min(short) / MiB:.0f} of {model_bytes / MiB:.0f} MiB)"
    return None


def outputs_problem(differences: list[str | None], ties_kept: list[bool] | None = None) -> str | None:
    """None when every actor's output was bit-identical and every tie survived."""
    bad = [(i, d) for i, d in enumerate(differences) if d]
    if bad:
        return f"{len(bad)} of {len(differences)} actors differ (actor {bad[0][0]}: {bad[0][1]})"
    if ties_kept is not None and not all(ties_kept):
        return f"tied weights came apart in {ties_kept.count(False)} of {len(ties_kept)} actors"
    return None


#: The check's own judgement of a write, so the benchmark and the gpu.isolation check cannot disagree.
write_problem = judge_write



def model_lost_problem(outcome: Mapping[str, Any], within_s: float = LOST_TIMEOUT_S) -> str | None:
    """None when loading after the owner and the weights are gone raised ModelLostError in time."""
    if outcome.get("error") is None:
        return "load succeeded although the GPU owner and the weights were gone"
    if not outcome.get("model_lost"):
        return f"load raised {outcome['error'][:160]}, not ModelLostError"
    if outcome.get("seconds", 0.0) > within_s:
        return f"ModelLostError only after {outcome['seconds']:.1f} s (> {within_s:.0f} s)"
    return None


def recovery_problem(outcome: Mapping[str, Any]) -> str | None:
    """None when a load after the GPU owner's death (weights still stored) worked and computed exactly."""
    if outcome.get("error"):
        return f"load after the owner's death failed: {outcome['error'][:160]}"
    return outputs_problem([outcome.get("difference")])


def release_problem(
    leftover: list[int] | None,
    used_after: int | None,
    used_before: int | None,
    owners_while_held: int | None = None,
    slack: int = RELEASE_SLACK,
) -> str | None:
    """None when no unexpected process is left on the GPU and used memory is back within ``slack``.

    ``owners_while_held`` is how many owner processes there were while one consumer
    still held the weights (None: the implementation has none): zero means the owner
    left too early, under a consumer's feet.
    """
    if owners_while_held == 0:
        return "the owner had exited while a consumer still held the weights"
    if leftover:
        return f"processes still on the GPU after the last consumer ended: {leftover}"
    if used_after is not None and used_before is not None and used_after - used_before > slack:
        return f"used memory still {(used_after - used_before) / MiB:.0f} MiB above where it was before the loads"
    return None


def verdicts(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each verdict of a run: ``ok`` True/False (None: not measured) and its text."""
    out: dict[str, dict[str, Any]] = {}

    def put(key: str, problem: str | None, measured: bool, ok_text: str) -> None:
        if not measured:
            out[key] = {"ok": None, "text": "not measured"}
        else:
            out[key] = {"ok": problem is None, "text": problem or ok_text}

    for name, pool in result.get("pools", {}).items():
        if "error" in pool:
            out[f"{name}.run"] = {"ok": False, "text": pool["error"]}
        big = pool.get("big12")
        if big:
            if pool.get("baseline"):
                put(f"{name}.private_copies", private_copies_problem(big["model_bytes"], big["allocated"]), big["cuda"], "each actor holds its own copy")
            else:
                owners = big.get("owners") or []
                owner = sum(o["allocated"] for o in owners) if owners and all("allocated" in o for o in owners) else None
                put(f"{name}.one_copy", one_copy_problem(big["model_bytes"], big["allocated"], owner, big.get("growth"), pool.get("context_bytes")),
                    big["cuda"], "one copy on the GPU for the pool")
            put(f"{name}.outputs_12", outputs_problem(big["differences"]), True, "bit-identical in every actor")
        exact = pool.get("exact")
        if exact:
            put(f"{name}.outputs_bf16_tied", outputs_problem(exact["differences"], exact["ties"]), True, "bit-identical, ties kept")
        write = pool.get("write")
        if write:
            put(f"{name}.write_policy", write_problem(write["declared"], write["observed"]), True, f"observed {write['observed']!r} as declared")
        many = pool.get("many5000")
        if many:
            stopped = str(many.get("error", "")).startswith("stopped:")
            put(f"{name}.outputs_5000", outputs_problem(many.get("differences", [])) or many.get("error"), not stopped, "bit-identical")
        rel = pool.get("release")
        if rel:
            held = None if pool.get("baseline") else rel.get("owners_while_one_consumer_left")
            put(f"{name}.released", release_problem(rel.get("leftover"), rel.get("used_after"), rel.get("used_before"), held),
                rel.get("measured", False), f"nothing left after {rel.get('seconds', 0):.1f} s")
        death = pool.get("owner_death") or {}
        if "recovery" in death:
            put(f"{name}.owner_death_recovers", recovery_problem(death["recovery"]), True, "a fresh owner, exact outputs")
        if "lost" in death:
            put(f"{name}.owner_death_model_lost", model_lost_problem(death["lost"]), True,
                f"ModelLostError after {death['lost'].get('seconds', 0):.1f} s")
    return out


def _mib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / MiB:.0f}"


def _loads(loads: list[float]) -> str:
    if not loads:
        return "n/a"
    later = f", then median {statistics.median(loads[1:]) * 1000:.0f} ms" if len(loads) > 1 else ""
    return f"first {loads[0] * 1000:.0f} ms{later}"


def figures(result: Mapping[str, Any]) -> dict[str, str]:
    """The headline figures, one line each: VRAM per process at pool 4, load times at 12 and 5,000 tensors."""
    out: dict[str, str] = {}
    vram, load12, load5000 = [], [], []
    for name, pool in result.get("pools", {}).items():
        big = pool.get("big12")
        if big:
            owners = big.get("owners") or []
            owner = (f", owner {' + '.join(_mib(o.get('allocated')) for o in owners)} MiB allocated"
                     f" / {' + '.join(_mib(o.get('nvml')) for o in owners)} MiB NVML") if owners else ""
            vram.append(
                f"{name}: allocated per actor {'/'.join(_mib(a) for a in big['allocated'])} MiB, "
                f"NVML per actor {'/'.join(_mib(a) for a in big.get('nvml') or [None] * len(big['allocated']))} MiB"
                f"{owner}, device +{_mib(big.get('growth'))} MiB (model {_mib(big['model_bytes'])} MiB, "
                f"one context {_mib(pool.get('context_bytes'))} MiB)"
            )
            load12.append(f"{name} {_loads(big['load_s'])}")
        many = pool.get("many5000")
        if many:
            load5000.append(f"{name} {_loads(many.get('load_s', []))}" + (f" ({many['error'][:80]})" if many.get("error") else ""))
    if vram:
        out[f"VRAM at pool {POOL}"] = " | ".join(vram)
    if load12:
        out["load time, 12 tensors"] = " | ".join(load12)
    if load5000:
        out["load time, 5000 tensors"] = " | ".join(load5000)
    return out


def markdown(result: Mapping[str, Any]) -> str:
    """The short report: machine, headline figures, verdicts."""
    m = result.get("machine", {})
    lines = [
        f"# GPU check: {m.get('gpu', 'no GPU')} (torch {m.get('torch')}, CUDA {m.get('cuda')}, Ray {m.get('ray')}, "
        f"Python {m.get('python')})",
        "",
        f"Status: **{result.get('status')}**" + (f" ({result['reason']})" if result.get("reason") else "")
        + f"; device {result.get('device')}; memory readings from {result.get('memory_source', 'n/a')}.",
        f"Pool of {POOL} actors (`num_gpus={1 / POOL}` each); 12-tensor model {result.get('sizes', {}).get('big_width')} wide.",
        "",
    ]
    for key, text in figures(result).items():
        lines.append(f"- **{key}**: {text}")
    lines += ["", "| verdict | result |", "|---|---|"]
    for key, v in verdicts(result).items():
        mark = {True: "pass", False: "**FAIL**", None: "n/a"}[v["ok"]]
        lines.append(f"| `{key}` | {mark}: {v['text'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


# --- actors --------------------------------------------------------------------------------


@ray.remote
class Consumer:
    """One pool member: CUDA context and cuBLAS workspace first (not counted as model memory), then loads on request."""

    def __init__(self, device: str):
        self.device = device
        if device.startswith("cuda"):
            _warm_up(device)
        self.models: dict[str, Any] = {}

    def pid(self) -> int:
        return os.getpid()

    def load(self, spec: str, box: list, key: str, reference_timeout_s: float | None = None) -> dict[str, Any]:
        """Load through the contract (or the reference's own API, with a timeout); report time and allocation, or the error."""
        start = time.perf_counter()
        try:
            if reference_timeout_s is not None:
                model = box[0].load(device=self.device, timeout_s=reference_timeout_s)
            else:
                model = load_implementation(spec).load(box[0], self.device)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 - the error is the measurement
            from zcbench.reference.errors import ModelLostError

            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "model_lost": isinstance(exc, ModelLostError),
                    "seconds": time.perf_counter() - start}
        self.models[key] = model
        return {"load_s": time.perf_counter() - start, "allocated": self.allocated(), "error": None}

    def allocated(self) -> int:
        return torch.cuda.memory_allocated() if self.device.startswith("cuda") else 0

    def run(self, key: str, args: tuple) -> Any:
        with torch.no_grad():
            return _to_cpu(self.models[key](*(a.to(self.device) for a in args)))

    def ties_kept(self, key: str) -> bool:
        m = self.models[key]
        return m.head.weight is m.embed.weight and m.head.weight.data_ptr() == m.embed.weight.data_ptr()

    def write_first(self, key: str) -> str | None:
        """Add 1 in place to the first parameter; the error text if the write was refused."""
        try:
            with torch.no_grad():
                next(self.models[key].parameters()).add_(1)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001
            return f"{type(exc).__name__}: {exc}"
        return None

    def drop(self, key: str | None = None) -> int:
        for k in [key] if key else list(self.models):
            self.models.pop(k, None)
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return self.allocated()


@ray.remote(num_cpus=0.01, num_gpus=0)
class Maker:
    """Wraps a model in its own process, so the weights die with it (it owns their ObjectRef)."""

    def make(self, spec: str, name: str, sizes: dict[str, int]) -> list:
        return [load_implementation(spec).wrap(build(name, Sizes(**sizes)), "actor")]


def _warm_up(device: str) -> None:
    """Create this process's CUDA context and cuBLAS workspaces now, so later readings count model memory only."""
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.ones(64, 64, device=device, dtype=dtype)
        (x @ x).sum().item()
    torch.cuda.synchronize()


# --- scenarios -----------------------------------------------------------------------------


class Budget:
    """The run's deadline: a phase starts only while enough time is left for it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.deadline = clock() + seconds

    def left(self) -> float:
        return self.deadline - self._clock()

    def allows(self, needed_s: float) -> bool:
        return self.left() >= needed_s

    def timeout(self, reserve_s: float = 0.0, cap_s: float = LOAD_TIMEOUT_S) -> float:
        """How long one wait may take: at most ``cap_s``, and never into the last ``reserve_s`` + 15 s."""
        return max(5.0, min(cap_s, self.left() - reserve_s - 15.0))


def _owners() -> list[dict[str, Any]]:
    """The reference's GPU owners now alive, with their stats (pid, allocated, leases) where readable."""
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if not a["name"].startswith(OWNER_PREFIX):
            continue
        entry: dict[str, Any] = {"name": a["name"], "namespace": a["namespace"]}
        try:
            entry.update(ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).stats.remote(), timeout=10))
        except Exception as exc:  # noqa: BLE001 - an owner that is shutting down has no stats
            entry["stats_error"] = type(exc).__name__
        out.append(entry)
    return out


def _kill_owners() -> int:
    owners = _owners()
    for o in owners:
        try:
            ray.kill(ray.get_actor(o["name"], namespace=o["namespace"]), no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    deadline = time.monotonic() + 20
    while _owners() and time.monotonic() < deadline:
        time.sleep(0.5)
    return len(owners)


def _expected(model: nn.Module, args: tuple, device: str) -> Any:
    # One CPU thread, as in an actor with a CPU fraction: BLAS sums differ between thread counts.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = _to_cpu(model.to(device)(*(a.to(device) for a in args)))
    finally:
        torch.set_num_threads(threads)
        model.to("cpu")
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


def _nvml_for(procs: dict[int, int | None] | None, pids: list[int]) -> list[int | None] | None:
    return None if procs is None else [procs.get(p) for p in pids]


def measure_pool(impl_name: str, device: str, sizes: Sizes, mem: GpuMemory, budget: Budget, save: Callable[[], None],
                 rec: dict[str, Any], reserve_s: float = 0.0) -> None:
    """Every phase for one implementation in one pool of :data:`POOL` actors; fills ``rec`` as it goes.

    The optional phases (5,000 tensors, release, owner death) start only while the
    budget leaves ``reserve_s`` for the implementations still to come.
    """
    impl = load_implementation(impl_name)
    cuda = device.startswith("cuda")
    rec["baseline"] = impl_name == "naive"
    declared = impl.capabilities.cuda_write_policy if cuda else impl.capabilities.write_policy
    options: dict[str, Any] = {"num_cpus": 0.01, "num_gpus": (1 / POOL) if cuda else 0}
    if impl.capabilities.worker_env:
        options["runtime_env"] = {"env_vars": dict(impl.capabilities.worker_env)}
    pool = [Consumer.options(**options).remote(device) for _ in range(POOL)]
    wrapped: dict[str, Any] = {}
    try:
        pids = ray.get([a.pid.remote() for a in pool], timeout=LOAD_TIMEOUT_S)
        # What each actor allocated before any load (its cuBLAS workspaces): subtracted, so only model bytes count.
        allocated_before = ray.get([a.allocated.remote() for a in pool])
        procs = mem.processes()
        rec["pids"] = pids
        baseline = _nvml_for(procs, pids)
        rec["context_bytes"] = _median([b for b in baseline or [] if b])
        used_before = mem.used()

        def load_all(key: str, actors: list[Any]) -> list[dict[str, Any]]:
            reports = []
            for a in actors:  # one by one: the first may start the owner the others map
                r = ray.get(a.load.remote(impl.spec, [wrapped[key]], key), timeout=budget.timeout())
                if r.get("error"):
                    raise RuntimeError(f"{key}: load failed: {r['error']}")
                reports.append(r)
            return reports

        def check_outputs(key: str, actors: list[Any], original: nn.Module) -> list[str | None]:
            expected = _expected(original, inputs(key, sizes), device)
            got = ray.get([a.run.remote(key, inputs(key, sizes)) for a in actors], timeout=LOAD_TIMEOUT_S)
            return [first_difference(g, expected, f"{key} output") for g in got]

        # 1. 12 tensors: VRAM per process at pool 4, load time, exact outputs
        original = build("big12", sizes)
        wrapped["big12"] = impl.wrap(original, "actor")
        reports = load_all("big12", pool)
        allocated = [a - b for a, b in zip(ray.get([a.allocated.remote() for a in pool]), allocated_before)]
        procs, used = mem.processes(), mem.used()
        owners = _owners() if cuda else []
        for o in owners:
            o["nvml"] = (procs or {}).get(o.get("pid", -1))
        rec["big12"] = {
            "cuda": cuda, "tensors": tensor_count(original), "model_bytes": storage_bytes(original),
            "load_s": [r["load_s"] for r in reports], "allocated": allocated, "nvml": _nvml_for(procs, pids),
            "owners": owners, "growth": None if used is None or used_before is None else used - used_before,
            "differences": check_outputs("big12", pool, original),
        }
        del original
        save()

        # 2. bf16 and tied weights
        original = build("exact", sizes)
        wrapped["exact"] = impl.wrap(original, "actor")
        load_all("exact", pool)
        rec["exact"] = {"differences": check_outputs("exact", pool, original),
                        "ties": ray.get([a.ties_kept.remote("exact") for a in pool])}
        # 3. the write policy, on that model: pool[0] writes, pool[1] must (not) see it
        expected = _expected(original, inputs("exact", sizes), device)
        error = ray.get(pool[0].write_first.remote("exact"))
        writer, other = ray.get([a.run.remote("exact", inputs("exact", sizes)) for a in pool[:2]])
        observed = classify_write(error, first_difference(writer, expected) is not None, first_difference(other, expected) is not None)
        rec["write"] = {"declared": declared, "observed": observed, "writer_error": error}
        ray.get([a.drop.remote("exact") for a in pool])
        del original
        save()

        # 4. 5,000 tensors: load time (stops at the first failure: per-tensor handles are the known cost)
        if budget.allows(60 + reserve_s):
            original = build("many5000", sizes)
            wrapped["many5000"] = impl.wrap(original, "actor")
            many: dict[str, Any] = {"tensors": tensor_count(original), "load_s": []}
            rec["many5000"] = many
            try:
                for a in pool:
                    if not budget.allows(30 + reserve_s):
                        many["error"] = "stopped: time budget"
                        break
                    r = ray.get(a.load.remote(impl.spec, [wrapped["many5000"]], "many5000"), timeout=budget.timeout(reserve_s))
                    if r.get("error"):
                        many["error"] = r["error"]
                        break
                    many["load_s"].append(r["load_s"])
                    save()
                else:
                    many["differences"] = check_outputs("many5000", pool[:2], original)
            except ray.exceptions.GetTimeoutError:
                many["error"] = f"a load did not finish within what the budget left ({budget.timeout(reserve_s):.0f} s)"
            del original
            save()

        # 5. memory released when the last consumer ends (three drop their models, the fourth dies)
        if budget.allows(RELEASE_TIMEOUT_S + 10 + reserve_s):
            ray.get([a.drop.remote() for a in pool[:3]])
            still = len(_owners()) if cuda else None
            ray.kill(pool[3], no_restart=True)
            if used_before is not None:  # the killed actor's own context goes too: do not count it as released model memory
                used_before -= (baseline[3] if baseline and baseline[3] else rec["context_bytes"]) or 0
            keep = {os.getpid(), *pids[:3]}
            start = time.monotonic()
            leftover: list[int] | None = None
            used_after = None
            while time.monotonic() - start < RELEASE_TIMEOUT_S:
                procs, used_after = mem.processes(), mem.used()
                leftover = None if procs is None else sorted(set(procs) - keep)
                if not (cuda and _owners()) and not leftover and (
                        used_after is None or used_before is None or used_after - used_before <= RELEASE_SLACK):
                    break
                time.sleep(1.0)
            rec["release"] = {
                "measured": cuda and (procs is not None or used_after is not None),
                "owners_while_one_consumer_left": still, "owners_after": len(_owners()) if cuda else None,
                "leftover": leftover, "used_before": used_before, "used_after": used_after,
                "seconds": time.monotonic() - start,
            }
            save()

        # 6. the reference's owner death: replaced while the weights are stored, ModelLostError once they are gone
        if impl_name == "reference" and budget.allows(60 + reserve_s):
            rec["owner_death"] = owner_death(impl, pool[:3], device, sizes, cuda)
            save()
    except Exception as exc:  # noqa: BLE001 - one failing implementation must not hide the others
        rec["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
    finally:
        for a in pool:
            ray.kill(a, no_restart=True)
        for w in wrapped.values():
            try:
                release(impl, w)
            except Exception:  # noqa: BLE001
                pass
        save()


def owner_death(impl: Any, actors: list[Any], device: str, sizes: Sizes, cuda: bool) -> dict[str, Any]:
    """Kill the GPU owner with the weights still stored (a new one must serve), then with them gone (ModelLostError).

    ``actors``: three idle pool members. The first maps the owner that is killed and is
    not used again (its tensors point at memory whose exporter died: undefined); the
    second loads after that death; the third has never fetched the lost weights.
    """
    victim, second, fresh = actors
    out: dict[str, Any] = {}
    if cuda:
        original = build("exact", sizes)
        wrapped = impl.wrap(original, "actor")
        ray.get(victim.load.remote(impl.spec, [wrapped], "death"), timeout=LOAD_TIMEOUT_S)
        out["owners_killed"] = _kill_owners()
        r = ray.get(second.load.remote(impl.spec, [wrapped], "death", LOST_TIMEOUT_S), timeout=LOAD_TIMEOUT_S)
        if not r.get("error"):
            got = ray.get(second.run.remote("death", inputs("exact", sizes)), timeout=LOAD_TIMEOUT_S)
            r["difference"] = first_difference(got, _expected(original, inputs("exact", sizes), device))
        out["recovery"] = r
        _quietly(lambda: ray.get(second.drop.remote(), timeout=30))
        _kill_owners()
        release(impl, wrapped)
    maker = Maker.remote()
    box = ray.get(maker.make.remote(impl.spec, "exact", asdict(sizes)), timeout=LOAD_TIMEOUT_S)
    first = ray.get(second.load.remote(impl.spec, box, "lost"), timeout=LOAD_TIMEOUT_S)
    out["lost_first_load"] = first.get("error") or "ok"
    ray.kill(maker, no_restart=True)  # the weights' ObjectRef dies with its owner
    if cuda:
        out["owners_killed_after_maker"] = _kill_owners()
    # The store keeps an object while a process still maps it, whoever owned it: let go of it.
    _quietly(lambda: ray.get(second.drop.remote(), timeout=30))
    time.sleep(1.0)
    try:
        r = ray.get(fresh.load.remote(impl.spec, box, "lost", LOST_TIMEOUT_S), timeout=LOST_TIMEOUT_S + 30)
    except ray.exceptions.GetTimeoutError:
        r = {"error": "no answer: the load hung", "model_lost": False, "seconds": LOST_TIMEOUT_S + 30}
    r.pop("allocated", None)
    out["lost"] = r
    for x in actors:
        _quietly(lambda x=x: ray.get(x.drop.remote(), timeout=30))
    return out


def _quietly(fn: Callable[[], Any]) -> None:
    """Run a clean-up step whose failure (an actor that crashed on undefined memory) must not end the check."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass


def _median(values: list[int]) -> int | None:
    return int(statistics.median(values)) if values else None


# --- the run -------------------------------------------------------------------------------


def machine(device: str) -> dict[str, Any]:
    """GPU, driver and library versions."""
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "ray": ray.__version__,
                            "python": platform.python_version(), "device": device}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return info


def _start_ray(cuda: bool) -> None:
    """A private local cluster for this process (its own, so a leftover cluster of another run is never joined).

    The GPU count is given, not detected: the pool's ``num_gpus`` actors must find it.
    """
    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address="local", num_cpus=max(8, os.cpu_count() or 1), num_gpus=torch.cuda.device_count() if cuda else 0,
                 object_store_memory=STORE_BYTES, include_dashboard=False, logging_level="ERROR", log_to_driver=False)


def finish(result: dict[str, Any], final: bool = True) -> dict[str, Any]:
    """Attach the verdicts, figures and problems; when ``final``, settle the status (ok, partial or failed)."""
    result["verdicts"] = verdicts(result)
    result["figures"] = figures(result)
    result["problems"] = {k: (None if v["ok"] else v["text"]) for k, v in result["verdicts"].items() if v["ok"] is not None}
    if final and result.get("status") == "running":
        failed = any(result["problems"].values())
        unmeasured = result.get("device", "").startswith("cuda") and any(v["ok"] is None for v in result["verdicts"].values())
        result["status"] = "failed" if failed else ("partial" if unmeasured else "ok")
    return result


def write(out: Path, result: dict[str, Any]) -> None:
    """Write gpu_check.json and gpu_check.md (each atomically: a kill between phases leaves the last complete file)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(result, indent=2, default=str) + "\n"), ("gpu_check.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def run(out: Path, impls: list[str], device: str, sizes: Sizes, budget_s: float) -> dict[str, Any]:
    """Run every phase for every implementation; returns the finished result (also written under ``out``)."""
    budget = Budget(budget_s)
    cuda = device.startswith("cuda")
    if cuda:
        _warm_up(device)  # the driver's own context exists before any reading it is compared with
    _start_ray(cuda)
    mem = GpuMemory(enabled=cuda)
    result: dict[str, Any] = {"kind": "zcbench-gpu-check", "status": "running", "device": device, "sizes": asdict(sizes),
                              "machine": machine(device), "memory_source": mem.source, "budget_s": budget_s, "pools": {}}

    def save() -> None:
        write(out, finish(result, final=False))

    for i, name in enumerate(impls):
        rec: dict[str, Any] = {}
        result["pools"][name] = rec
        if not budget.allows(45):
            rec["error"] = "not run: time budget spent"
            continue
        measure_pool(name, device, sizes, mem, budget, save, rec, reserve_s=PER_BASELINE_S * (len(impls) - i - 1))
    result["seconds"] = budget_s - budget.left()
    finish(result)
    write(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    """CLI; exit 0 when no measured verdict failed (or nothing could be measured and that was allowed), else 1 (2: no CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/gpu/out"))
    parser.add_argument("--impl", action="append", help="implementations to measure (default: reference, naive)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same scenarios on the CPU with small models (a dry run of the mechanics)")
    parser.add_argument("--allow-no-cuda", action="store_true", help="without CUDA, report skipped and exit 0")
    parser.add_argument("--budget-s", type=float, default=150.0, help="stop starting phases when this is spent")
    parser.add_argument("--width", type=int, help="width of the 12-tensor model (default 4096 on CUDA, 512 on CPU)")
    args = parser.parse_args(argv)
    impls = args.impl or ["reference", "naive"]
    if args.device == "cuda" and not torch.cuda.is_available():
        result = {"kind": "zcbench-gpu-check", "status": "skipped", "reason": "no CUDA device: nothing measured",
                  "device": "cuda", "machine": {"torch": torch.__version__, "python": platform.python_version()}, "pools": {}}
        write(args.out, finish(result))
        print(f"gpu_check: {result['reason']}")
        return 0 if args.allow_no_cuda else 2
    sizes = GPU_SIZES if args.device == "cuda" else CPU_SIZES
    if args.width:
        sizes = Sizes(**{**asdict(sizes), "big_width": args.width})
    result = run(args.out, impls, args.device, sizes, args.budget_s)
    print(markdown(result))
    return 0 if result["status"] in ("ok", "partial") else 1  # partial: some reading n/a here, none failed


if __name__ == "__main__":
    raise SystemExit(main())
