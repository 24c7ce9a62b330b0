"""Run the benchmark matrix: interleaved rounds, statistics, atomic saves after every cell, resume.

Cells are measured by a runner (normally :class:`SubprocessRunner`, one measuring
process per driver environment). Within each matrix point the implementations take
turns round by round, in an order that reverses every round (A B, B A, A B, ...): slow
drift of a shared machine hits all alike, and going first (right after the previous
job's clean-up) favours none. Ratios between implementations are taken per round
(paired) before their spread.
Every results file records the suite fingerprint of the code that measured it.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from zcbench.suites.contract import load_implementation

from . import machine, schema
from .matrix import Settings, cell_id, cell_keys, is_steady, rows_for
from .metrics import metric_meta
from .progress import Progress
from .stats import summarize, turn_order

ZERO_COPY_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
FINAL = ("ok", "skipped")


class Runner(Protocol):
    """Measures one round of one cell; returns ``{"ok": True, "metrics", "valid", "audit"}`` or ``{"ok": False, "error"}``.

    ``job`` is :class:`zcbench.harness.cells.Job` as a dict (rows, files, seed, warm-up calls, audit batches).
    """

    def run(self, impl: str, params: dict[str, Any], job: dict[str, Any], timeout_s: float) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class WorkerProcess:
    """One measuring process (``python -m zcbench.harness.worker``) speaking JSON lines."""

    def __init__(self, env_overrides: dict[str, str], ray_address: str | None, command: list[str] | None = None,
                 cluster: dict[str, str] | None = None):
        env = dict(os.environ)
        if ZERO_COPY_ENV not in env_overrides:  # the switch changes what ray.put does to tensors: only who asks gets it
            env.pop(ZERO_COPY_ENV, None)
        env.update(env_overrides)
        if ray_address:
            env["ZCBENCH_RAY_ADDRESS"] = ray_address
        env.update(cluster or {})
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"zcbench-worker-{os.getpid()}-{uuid.uuid4().hex[:6]}.log", "w")
        self.proc = subprocess.Popen(
            command or [sys.executable, "-m", "zcbench.harness.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            start_new_session=True,  # its Ray processes share the group, so a kill takes them along
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def receive(self, timeout_s: float) -> dict[str, Any]:
        """The next reply; raises TimeoutError, or RuntimeError when the process died."""
        try:
            line = self.lines.get(timeout=timeout_s)
        except queue.Empty:
            raise TimeoutError(f"no answer within {timeout_s:.0f} s") from None
        if line is None:
            code = self.proc.wait()
            raise RuntimeError(f"measuring process exited with code {code} (log: {self.log.name})")
        return json.loads(line)

    def send(self, obj: dict[str, Any]) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def close(self, grace_s: float = 10.0) -> None:
        """Ask it to quit; kill its whole process group if it does not."""
        if self.proc.poll() is None:
            try:
                self.send({"op": "quit"})
                self.proc.wait(timeout=grace_s)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self.kill(keep_log=False)

    def kill(self, keep_log: bool = True) -> None:
        """Kill the process group; the log is kept for diagnosis unless this was a normal close."""
        if self.proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        else:
            try:  # the process is gone; its Ray children may not be
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.log.close()
        if not keep_log:
            Path(self.log.name).unlink(missing_ok=True)


class SubprocessRunner:
    """One measuring process per driver environment, started on first use and restarted after a failure."""

    def __init__(self, envs: dict[str, dict[str, str]], ray_address: str | None = None, start_timeout_s: float = 180.0,
                 command: list[str] | None = None, cluster: dict[str, str] | None = None):
        self.envs = envs  # implementation name -> environment overrides
        self.command = command  # tests substitute a fake measuring process
        self.ray_address = ray_address
        self.cluster = cluster or {}  # ZCBENCH_NODES / _NODE_CPUS / _STORE_BYTES for worker.py
        self.start_timeout_s = start_timeout_s
        self.workers: dict[tuple, WorkerProcess] = {}

    def _worker(self, impl: str) -> WorkerProcess:
        key = tuple(sorted(self.envs.get(impl, {}).items()))
        w = self.workers.get(key)
        if w is None or w.proc.poll() is not None:
            w = WorkerProcess(dict(key), self.ray_address, self.command, self.cluster)
            hello = w.receive(self.start_timeout_s)
            if not hello.get("ok"):
                w.kill()
                raise ConnectionError(hello.get("error", "measuring process failed to start"))
            self.workers[key] = w
        return w

    @property
    def processes(self) -> int:
        """Measuring processes this runner will need (one per distinct driver environment)."""
        return len({tuple(sorted(e.items())) for e in self.envs.values()}) or 1

    def run(self, impl: str, params: dict[str, Any], job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        w = self._worker(impl)
        try:
            w.send({"op": "cell", "impl": impl, "params": params, "job": job})
            return w.receive(timeout_s)
        except (TimeoutError, RuntimeError, OSError) as exc:
            w.kill()
            self.workers = {k: v for k, v in self.workers.items() if v is not w}
            what = "cell timeout" if isinstance(exc, TimeoutError) else "worker died"
            return {"ok": False, "error": f"{what}: {exc}"}

    def close(self) -> None:
        for w in self.workers.values():
            w.close()
        self.workers.clear()


def cluster_env(settings: Settings) -> dict[str, str]:
    """The measuring process's cluster: ``settings.nodes`` identical nodes, each with a store for the run's
    largest model (1.25x, plus headroom for Ray Data's blocks and a previous round's copy being freed) and
    logical CPUs for the largest pool's fractional actors plus Ray Data's read and write tasks."""
    import math

    from zcbench.suites.pipeline import POOL_ACTOR_CPUS

    from .estimate import model_bytes

    largest = max(model_bytes(m) for m in settings.models)
    store = max(1024 * 2**20, int(1.25 * largest) + 256 * 2**20)
    cpus = max(4, math.ceil(max(settings.pools) * POOL_ACTOR_CPUS / settings.nodes) + 2)
    return {"ZCBENCH_NODES": str(settings.nodes), "ZCBENCH_NODE_CPUS": str(cpus), "ZCBENCH_STORE_BYTES": str(store)}


def implementation_info(names: list[str]) -> list[dict[str, Any]]:
    """Name, version, spec, capabilities and process environment of each implementation (imports them)."""
    out = []
    for n in names:
        impl = load_implementation(n)
        out.append({
            "name": n, "version": str(impl.version), "spec": impl.spec,
            # The measuring process's environment: worker_env, set before it imports ray.
            "capabilities": impl.capabilities.as_dict(), "process_env": dict(impl.capabilities.worker_env),
        })
    return out


def new_document(settings: Settings, impls: list[dict[str, Any]], command: list[str] | None = None) -> dict[str, Any]:
    """A results document with every cell ``missing``; filled in as cells finish."""
    cells = []
    for key in cell_keys(settings):
        for info in impls:
            params = {"impl": info["name"], **key}
            cells.append({"id": cell_id(params), "params": params, "status": "missing", "error": "not run yet",
                          "validity": "UNKNOWN", "audit": None, "rounds": 0, "metrics": {}})
    from zcbench.suites import fingerprint

    extra = {f"impl:{i['name']}": i["version"] for i in impls}
    return {
        "kind": schema.KIND, "schema_version": schema.SCHEMA_VERSION, "suite_fingerprint": fingerprint.current(),
        "run_id": uuid.uuid4().hex,
        "created": _now(), "updated": _now(), "complete": False, "command": list(command or sys.argv), "wall_s": 0.0,
        "machine": machine.machine_info(), "versions": machine.versions(extra), "commit": machine.git_commit(),
        "implementations": impls, "settings": settings.as_dict(), "cells": cells,
    }


def _skip_reason(info: dict[str, Any], params: dict[str, Any]) -> str | None:
    caps = info["capabilities"]
    if params["device"] == "cuda" and not caps.get("cuda"):
        return f"{info['name']} does not declare CUDA support"
    if params["device"] == "cpu" and not caps.get("cpu", True):
        return f"{info['name']} does not declare CPU support"
    return None


def _metric(name: str, values: list[float]) -> dict[str, Any]:
    unit, better = metric_meta(name)
    st = summarize(values)
    return {"value": st["median"], "unit": unit, "better": better, "stats": st, "values": [float(v) for v in values]}


def _paired(mine: dict[str, Any], theirs: dict[str, Any], ratio: Any) -> list[float]:
    pairs = zip(mine.get("values") or [mine["value"]], theirs.get("values") or [theirs["value"]])
    return [r for a, b in pairs if (r := ratio(a, b)) is not None and r == r]  # r == r: not NaN


def add_naive_ratio(cells: list[dict[str, Any]], baseline: str = "naive") -> None:
    """Ratios to the privately-owning baseline at the same point, one per round (rounds are interleaved, so each
    pair saw the same machine), then median and spread: ``throughput_vs_naive`` (steady rows/s over naive's) and
    ``speed_vs_naive`` (naive's steady per-batch latency over this one's)."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for c in cells:
        p = c["params"]
        if p["impl"] == baseline and c["status"] == "ok":
            by_key[(p["model"], p["device"], p["pool"], p["batch"])] = c
    for c in cells:
        p = c["params"]
        base = by_key.get((p["model"], p["device"], p["pool"], p["batch"]))
        if c["status"] != "ok" or base is None or base is c:
            continue
        for name, metric, ratio in (("throughput_vs_naive", "throughput_rows_s", lambda a, b: a / b if b > 0 else None),
                                    ("speed_vs_naive", "latency_p50_s", lambda a, b: b / a if a > 0 else None)):  # fmt: skip
            mine, theirs = c["metrics"].get(metric), base["metrics"].get(metric)
            if mine is not None and theirs is not None and (values := _paired(mine, theirs, ratio)):
                c["metrics"][name] = _metric(name, values)


def round_line(cell: dict[str, Any], rnd: int, rounds: int, res: dict[str, Any]) -> str:
    """One progress line for a finished round: the cell, its audit, and the headline figures."""
    p = cell["params"]
    head = f"{p['impl']} {p['model']} pool {p['pool']} batch {p['batch']} round {rnd}/{rounds}"
    if not res.get("ok"):
        return f"{head}: failed ({res.get('error', 'unknown error')})"
    m = res["metrics"]
    parts = [("VALID" if res["valid"] else "INVALID")]
    if "load_cold_s" in m:
        parts.append(f"load {m['load_cold_s'] * 1e3:.0f} ms")
    if "model_copies" in m:
        parts.append(f"model costs {m['model_copies']:.2f} copies")
    if "throughput_rows_s" in m:
        parts.append(f"{m['throughput_rows_s']:.0f} rows/s")
    return f"{head}: " + ", ".join(parts)


def job_for(settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~zcbench.harness.cells.Job` of a cell, as sent to the measuring process."""
    plan = rows_for(settings, params["pool"], params["batch"])
    return {"rows": plan.rows, "files": plan.files, "seed": settings.seed, "warmup_calls": settings.warmup_calls,
            "audit_batches": settings.audit_batches, "steady": is_steady(settings, params["pool"])}  # fmt: skip


def run_matrix(
    doc: dict[str, Any],
    runner: Runner,
    out: str | os.PathLike,
    *,
    stream: Any = None,
    expected_s: float | None = None,
) -> dict[str, Any]:
    """Measure every cell of ``doc`` that is not final yet, saving after each matrix point; returns the document.

    Progress (one item per round of a cell) goes to ``stream`` (stderr by default): a bar on a
    terminal, plain flushed lines otherwise. On Ctrl-C/SIGTERM the unfinished cells stay
    ``missing`` with the reason, the file is saved, and KeyboardInterrupt propagates.
    """
    settings = Settings.from_dict(doc["settings"])
    infos = {i["name"]: i for i in doc["implementations"]}
    by_id = {c["id"]: c for c in doc["cells"]}
    started = time.perf_counter()
    wall_before = float(doc.get("wall_s") or 0.0)
    todo = [c for c in doc["cells"] if c["status"] not in FINAL]
    rounds = settings.warmup + settings.rounds

    def save() -> None:
        add_naive_ratio(doc["cells"])
        doc["updated"] = _now()
        doc["wall_s"] = wall_before + time.perf_counter() - started
        doc["complete"] = all(c["status"] in ("ok", "failed", "skipped") for c in doc["cells"])
        schema.write_atomic(out, doc)

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # a kill -TERM saves like Ctrl-C does
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        save()
        with Progress("benchmark", total=len(todo) * rounds, expected_s=expected_s, stream=stream) as bar:
            for key in cell_keys(settings):
                cells = [by_id[cell_id({"impl": name, **key})] for name in settings.impls]
                cells = [c for c in cells if c["status"] not in FINAL]
                if not cells:
                    continue
                samples: dict[str, dict[str, list[float]]] = {c["id"]: {} for c in cells}
                live = []
                for c in cells:
                    reason = _skip_reason(infos[c["params"]["impl"]], c["params"])
                    if reason:
                        c.update(status="skipped", error=reason, metrics={}, rounds=0)
                        bar.advance(f"{c['id']}: skipped ({reason})", amount=rounds)
                    else:
                        c.update(validity="UNKNOWN", audit=None, _invalid=[])
                        live.append(c)
                job = job_for(settings, key)
                for rnd in range(rounds):
                    for c in turn_order(live, rnd):
                        if c.get("_failed"):
                            bar.advance(f"{c['id']} round {rnd + 1}: skipped after a failure")
                            continue
                        res = runner.run(c["params"]["impl"], c["params"], job, settings.cell_timeout_s)
                        bar.advance(round_line(c, rnd + 1, rounds, res))
                        if not res.get("ok"):
                            c["_failed"] = f"round {rnd + 1}: {res.get('error', 'unknown error')}"
                            continue
                        if not res["valid"]:
                            c["_invalid"].append(f"round {rnd + 1}: {res['audit']}")
                        c["audit"] = res["audit"]
                        if rnd >= settings.warmup:
                            for name, value in res["metrics"].items():
                                samples[c["id"]].setdefault(name, []).append(value)
                for c in live:
                    invalid = c.pop("_invalid", [])
                    failed = c.pop("_failed", None)
                    if failed:
                        c.update(status="failed", error=failed, metrics={}, rounds=0)
                    else:
                        c["metrics"] = {n: _metric(n, v) for n, v in samples[c["id"]].items()}
                        c["rounds"] = settings.rounds
                        c["status"], c["error"] = "ok", None
                        c["validity"] = "INVALID" if invalid else "VALID"
                        if invalid:
                            c["audit"] = "; ".join(invalid)
                save()
    except KeyboardInterrupt:
        for c in doc["cells"]:
            c.pop("_failed", None)
            c.pop("_invalid", None)
            if c["status"] not in ("ok", "failed", "skipped"):
                c.update(status="missing", error="interrupted before this cell finished; run with --resume to complete it",
                         metrics={}, rounds=0, validity="UNKNOWN")
        save()
        raise
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    return doc


def installed_impls() -> list[str]:
    """Registered implementations whose adapters import here (an adapter that does not import is not installed)."""
    from zcbench.suites.contract import REGISTRY

    names = []
    for name in REGISTRY:
        try:
            load_implementation(name)
            names.append(name)
        except Exception:  # noqa: BLE001 - any import problem means: not installed
            pass
    return names


def execute(doc: dict[str, Any], out: str | os.PathLike, *, stream: Any = None) -> dict[str, Any]:
    """Run ``doc``'s unfinished cells with measuring subprocesses, saying first how long it should take."""
    from .estimate import clock, run_seconds

    stream = stream or sys.stderr
    settings = Settings.from_dict(doc["settings"])
    envs = {i["name"]: i.get("process_env") or {} for i in doc["implementations"]}
    runner = SubprocessRunner(envs, settings.ray_address, cluster=cluster_env(settings))
    todo = [c["params"] for c in doc["cells"] if c["status"] not in FINAL]
    expected = run_seconds(settings, getattr(runner, "processes", 1), todo)
    print(f"zcbench: {len(todo)} cells to measure, expected about {clock(expected)} on an idle 2-core machine -> {out}",
          file=stream, flush=True)  # fmt: skip
    try:
        return run_matrix(doc, runner, out, stream=stream, expected_s=expected)
    finally:
        runner.close()
