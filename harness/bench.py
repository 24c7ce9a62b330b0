"""Run the benchmark matrix: interleaved rounds, statistics, atomic saves after every cell, resume.

Cells are measured by a runner (normally :class:`SubprocessRunner`, one measuring
process per driver environment). Within each matrix point the implementations take
turns round by round (A B A B ...), so slow drift of a shared machine hits all alike.
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
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from zcbench.suites.contract import load_implementation

from . import machine, schema
from .cells import metric_meta
from .matrix import Settings, cell_id, cell_keys, resolve_model
from .stats import summarize

ZERO_COPY_ENV = "RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"
FINAL = ("ok", "skipped")


class Runner(Protocol):
    """Measures one round of one cell; returns ``{"ok": True, "metrics", "valid", "audit"}`` or ``{"ok": False, "error"}``."""

    def run(self, impl: str, params: dict[str, Any], rows: int, seed: int, timeout_s: float) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def process_env(worker_env: dict[str, str]) -> dict[str, str]:
    """The driver environment an implementation's measuring process gets: its worker_env, and
    no zero-copy switch unless it asks for it (the switch changes what ``ray.put`` does to tensors)."""
    return dict(worker_env)


class WorkerProcess:
    """One measuring process (``python -m zcbench.harness.worker``) speaking JSON lines."""

    def __init__(self, env_overrides: dict[str, str], ray_address: str | None, command: list[str] | None = None,
                 nodes: int = 1):
        env = dict(os.environ)
        if ZERO_COPY_ENV not in env_overrides:
            env.pop(ZERO_COPY_ENV, None)
        env.update(env_overrides)
        if ray_address:
            env["ZCBENCH_RAY_ADDRESS"] = ray_address
        env["ZCBENCH_NODES"] = str(nodes)
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
                 command: list[str] | None = None, nodes: int = 1):
        self.envs = envs  # implementation name -> environment overrides
        self.command = command  # tests substitute a fake measuring process
        self.ray_address = ray_address
        self.nodes = nodes
        self.start_timeout_s = start_timeout_s
        self.workers: dict[tuple, WorkerProcess] = {}

    def _worker(self, impl: str) -> WorkerProcess:
        key = tuple(sorted(self.envs.get(impl, {}).items()))
        w = self.workers.get(key)
        if w is None or w.proc.poll() is not None:
            w = WorkerProcess(dict(key), self.ray_address, self.command, self.nodes)
            hello = w.receive(self.start_timeout_s)
            if not hello.get("ok"):
                w.kill()
                raise ConnectionError(hello.get("error", "measuring process failed to start"))
            self.workers[key] = w
        return w

    def run(self, impl: str, params: dict[str, Any], rows: int, seed: int, timeout_s: float) -> dict[str, Any]:
        w = self._worker(impl)
        try:
            w.send({"op": "cell", "impl": impl, "params": params, "rows": rows, "seed": seed})
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


def implementation_info(names: list[str]) -> list[dict[str, Any]]:
    """Name, version, spec, capabilities and process environment of each implementation (imports them)."""
    out = []
    for n in names:
        impl = load_implementation(n)
        out.append({
            "name": n, "version": str(impl.version), "spec": impl.spec,
            "capabilities": impl.capabilities.as_dict(), "process_env": process_env(impl.capabilities.worker_env),
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
    extra = {f"impl:{i['name']}": i["version"] for i in impls}
    return {
        "kind": schema.KIND, "schema_version": schema.SCHEMA_VERSION, "run_id": uuid.uuid4().hex,
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


def add_naive_ratio(cells: list[dict[str, Any]], baseline: str = "naive") -> None:
    """throughput_vs_naive: each cell's median throughput over the privately-owning baseline's, same point."""
    by_key: dict[tuple, dict[str, Any]] = {}
    for c in cells:
        p = c["params"]
        if p["impl"] == baseline and c["status"] == "ok" and "throughput_rows_s" in c["metrics"]:
            by_key[(p["model"], p["device"], p["pool"], p["batch"])] = c
    for c in cells:
        p = c["params"]
        base = by_key.get((p["model"], p["device"], p["pool"], p["batch"]))
        if c["status"] == "ok" and base and "throughput_rows_s" in c["metrics"]:
            ratio = c["metrics"]["throughput_rows_s"]["value"] / base["metrics"]["throughput_rows_s"]["value"]
            c["metrics"]["throughput_vs_naive"] = {"value": ratio, "unit": "x", "better": "higher"}


def _progress_line(i: int, n: int, cell: dict[str, Any], seconds: float) -> str:
    p, m = cell["params"], cell["metrics"]
    head = f"[{i}/{n}] {p['impl']:<13} {p['model']} {p['device']} pool={p['pool']} batch={p['batch']}: {cell['status']}"
    if cell["status"] != "ok":
        return f"{head} ({cell['error']}) {seconds:.1f}s"
    mib = 2**20
    return (f"{head} {cell['validity']} load={m['load_cold_s']['value']:.3f}s "
            f"uss/actor={m['actor_uss_infer_bytes']['value'] / mib:.0f}MiB pool={m['pool_total_bytes']['value'] / mib:.0f}MiB "
            f"{m['throughput_rows_s']['value']:.0f} rows/s {seconds:.1f}s")


def run_matrix(
    doc: dict[str, Any],
    runner: Runner,
    out: str | os.PathLike,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Measure every cell of ``doc`` that is not final yet, saving after each; returns the document.

    On Ctrl-C/SIGTERM the unfinished cells stay ``missing`` with the reason, the file is
    saved, and KeyboardInterrupt propagates.
    """
    settings = Settings.from_dict(doc["settings"])
    infos = {i["name"]: i for i in doc["implementations"]}
    by_id = {c["id"]: c for c in doc["cells"]}
    started = time.perf_counter()
    wall_before = float(doc.get("wall_s") or 0.0)
    todo = [c for c in doc["cells"] if c["status"] not in FINAL]
    done_count = len(doc["cells"]) - len(todo)

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
        for key in cell_keys(settings):
            cells = [by_id[cell_id({"impl": name, **key})] for name in settings.impls]
            cells = [c for c in cells if c["status"] not in FINAL]
            if not cells:
                continue
            key_start = time.perf_counter()
            samples: dict[str, dict[str, list[float]]] = {c["id"]: {} for c in cells}
            live = []
            for c in cells:
                reason = _skip_reason(infos[c["params"]["impl"]], c["params"])
                if reason:
                    c.update(status="skipped", error=reason, metrics={}, rounds=0)
                else:
                    c.update(validity="UNKNOWN", audit=None, _invalid=[])
                    live.append(c)
            for rnd in range(settings.warmup + settings.rounds):
                for c in live:  # A B A B ...: implementations take turns every round
                    if c.get("_failed"):
                        continue
                    res = runner.run(c["params"]["impl"], c["params"], settings.rows, settings.seed, settings.cell_timeout_s)
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
            secs = time.perf_counter() - key_start
            save()
            for c in cells:
                done_count += 1
                log(_progress_line(done_count, len(doc["cells"]), c, secs))
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


def check_models(settings: Settings) -> None:
    """Import each model case once in this process (cheap), so bad names fail before any worker starts."""
    for m in settings.models:
        resolve_model(m)
