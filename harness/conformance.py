"""The conformance matrix: every implementation x every check, one subprocess per implementation.

Each implementation runs in its own Python process with its ``worker_env`` exported
before anything imports ray (Ray reads ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` at import),
so one crash or hang cannot take the others' results with it. The child runs the one
executor (:func:`zcbench.suites.executor.run_checks`), reports each verdict as it comes
and rewrites its results file after every check, so a crash or a time-out keeps the
checks already judged. ``matrix.json`` (schema ``harness/matrix.schema.json``) and
``matrix.md`` are rewritten after each implementation: an interrupted run leaves a
matrix marked incomplete, never a stitched one::

    zcbench conformance --impl reference --impl naive --out results/conformance

``--jobs 2`` runs two implementations at a time, each in its own process and its own
private Ray cluster (nothing is shared: object stores, raylets, probe actors). One run
keeps two cores about 80 % busy (most of it new processes importing torch), so the gain is
the idle rest: on this 2-core machine class reference and naive took 360 s two at a time
against 430 s one after the other. Checks that judge durations (``timed``) must not run
beside another implementation's actors starting on the same cores (a naive load of 5,000
tensors once took 2.0 s instead of about 0.1 s that way and failed ``scale.many_tensors``):
with ``--jobs`` the implementations run in batches of that many, each run holds its timed
checks back until every run of its batch has reached them or ended (:class:`TimedGate`),
and then they go one run at a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import schema
from .machine import git_commit, machine_info
from .progress import Progress

PROFILES = {"ci": "zcbench-ci", "thorough": "zcbench-thorough"}
DEFAULT_TIMEOUT_S = 3600.0
STATUSES = ("pass", "fail", "error", "skip", "xfail", "xpass")
CELL = {"pass": "pass", "xfail": "xfail", "xpass": "**XPASS**"}
NEEDS_ENV_EXIT = 3  # the subprocess asks to be started again with the implementation's env


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _tail(text: str | bytes | None, lines: int = 30) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def _machine_line(m: dict[str, Any]) -> str:
    return f"{m.get('hostname')}: {m.get('cpu_model')}, {m.get('cores_logical')} logical cores, {m.get('ram_bytes', 0) / 2**30:.0f} GiB"


def counts(results: list[dict[str, Any]]) -> dict[str, int]:
    """How many results have each status."""
    c = Counter(r["status"] for r in results)
    return {s: c.get(s, 0) for s in STATUSES}


#: Children still running: an interrupted matrix kills them all (their own sessions get no Ctrl-C).
_LIVE: set[_Child] = set()


class _Child:
    """One implementation's subprocess: its verdicts arrive as JSON lines on stdout while it runs."""

    def __init__(self, cmd: list[str], env: dict[str, str], on_line):
        # Own session, so a time-out kills the run's Ray processes too. stdin is how a TimedGate lets it go on.
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, text=True)  # fmt: skip
        self.stderr: list[str] = []
        _LIVE.add(self)
        threading.Thread(target=self._read, args=(self.proc.stdout, on_line), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr.append), daemon=True).start()

    @staticmethod
    def _read(stream, sink) -> None:
        for line in stream:
            sink(line)

    def wait(self, timeout_s: float) -> int | None:
        """Exit status, or None after killing it at the time-out."""
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None
        _LIVE.discard(self)
        return rc

    def go_on(self) -> None:
        """Tell a run waiting before its timed checks to go on (nothing if it has ended)."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        _LIVE.discard(self)


#: The line a run prints, then waits on stdin, before its timed checks (``--gate``).
GATE_LINE = {"gate": "timed"}


class TimedGate:
    """Lets each run of a batch on to its timed checks only when every other run of the batch
    waits there too or has ended, one run at a time, in the batch's order."""

    def __init__(self, names: list[str]):
        self.order = list(names)
        self.waiting: list[str] = []
        self.ended: set[str] = set()
        self.passed: str | None = None  # the run now in its timed checks
        self.cond = threading.Condition()

    def arrive(self, name: str) -> None:
        """Block until ``name`` may run its timed checks (returns at once if it has ended meanwhile)."""
        with self.cond:
            self.waiting.append(name)
            self.cond.notify_all()
            self.cond.wait_for(lambda: name in self.ended or (self.passed is None and not self._running() and self._next() == name))
            self.waiting.remove(name)
            if name not in self.ended:
                self.passed = name

    def end(self, name: str) -> None:
        """``name``'s run is over (finished, crashed or killed)."""
        with self.cond:
            self.ended.add(name)
            if self.passed == name:
                self.passed = None
            self.cond.notify_all()

    def _running(self) -> bool:
        """Some run is still in its untimed checks (neither waiting here, nor passed, nor ended)."""
        return any(n not in self.waiting and n not in self.ended and n != self.passed for n in self.order)

    def _next(self) -> str | None:
        return min(self.waiting, key=self.order.index, default=None)


def run_one(
    impl: str,
    *,
    select: list[str] | None = None,
    profile: str = "ci",
    expected_failures: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ray_address: str | None = None,
    progress: Progress | None = None,
    gate: TimedGate | None = None,
) -> dict[str, Any]:
    """Run one implementation's checks in a subprocess; always return a column (status ok/crashed/timeout).

    With ``gate``, the run's timed checks come last and start when the gate lets them.
    """
    started, clock = _now(), time.perf_counter()
    git = git_commit()
    column: dict[str, Any] = {"implementation": impl, "status": "crashed", "reason": None, "header": None, "results": [], "warnings": []}
    env = {**os.environ, "ZCBENCH_PROFILE": PROFILES[profile], "PYTHONUNBUFFERED": "1"}
    env.setdefault("RAY_AUTH_MODE", "disabled")

    child: _Child | None = None

    def on_line(line: str) -> None:
        if not line.startswith("{"):
            return
        r = json.loads(line)
        if r == GATE_LINE and gate is not None and child is not None:
            gate.arrive(impl)  # this reader thread waits; the child waits on its stdin
            child.go_on()
        elif "check_id" in r and progress is not None:
            progress.advance(f"{impl} {r['check_id']}: {r['status']}")

    rc: int | None = None
    with tempfile.TemporaryDirectory(prefix="zcbench-conformance-") as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, "-m", "zcbench.harness.conformance", "--one", impl, "--json", str(out), "--profile", profile]
        for s in select or []:
            cmd += ["--select", s]
        if expected_failures:
            cmd += ["--xfails", f"{impl}={expected_failures}"]
        if ray_address:
            cmd += ["--ray-address", ray_address]
        if gate is not None:
            cmd += ["--gate"]
        # The adapter's worker_env is only known once it is imported, and importing it may
        # import ray: the subprocess then says which env it needs and is started again with it.
        try:
            for _attempt in range(2):
                child = _Child(cmd, env, on_line)
                try:
                    rc = child.wait(timeout_s - (time.perf_counter() - clock))
                except BaseException:
                    child.kill()
                    raise
                if rc == NEEDS_ENV_EXIT and out.exists():
                    env.update(json.loads(out.read_text())["needs_env"])
                    out.unlink()
                    continue
                break
        finally:
            if gate is not None:
                gate.end(impl)  # however the run ended: the others must not wait for it
        stderr = "".join(child.stderr)
        if out.exists():
            column.update({k: v for k, v in json.loads(out.read_text()).items() if k in ("header", "results", "warnings")})
    if rc is None:
        column.update(status="timeout", reason=f"no result after {timeout_s:.0f} s; {len(column['results'])} checks judged before")
    elif rc == 0:
        column.update(status="ok")
    else:
        column.update(reason=f"subprocess exited with status {rc}: {_tail(stderr, 1)}")
    if column["status"] != "ok":
        column["stderr_tail"] = _tail(stderr)
    header = column["header"] or {}
    column["counts"] = counts(column["results"])
    column["provenance"] = {
        "commit": git.get("sha"),
        "dirty": git.get("dirty"),
        "suite_fingerprint": header.get("suite_fingerprint") or _fingerprint(),
        "machine": _machine_line(machine_info()),
        "started": started,
        "finished": _now(),
        "profile": PROFILES[profile],
        "retries": sum(1 for r in column["results"] if r.get("attempts", 0) > 1),
        "duration_s": round(time.perf_counter() - clock, 1),
    }
    return column


def _fingerprint() -> str:
    from zcbench.suites import fingerprint

    return fingerprint.current()


def _expected_checks(select: list[str] | None) -> int:
    from zcbench.suites.executor import select_checks

    return len(select_checks(select))


def run_matrix(
    impls: list[str],
    out_dir: Path,
    select: list[str] | None = None,
    profile: str = "ci",
    *,
    expected_failures: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ray_address: str | None = None,
    command: list[str] | None = None,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every implementation, ``jobs`` at a time, writing ``matrix.json`` and ``matrix.md`` under ``out_dir``
    after each; return the matrix (its columns in the order of ``impls``, however they finished)."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {sorted(PROFILES)}")
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    if jobs > 1 and ray_address:
        raise ValueError("jobs > 1 needs a private cluster per implementation; --ray-address attaches them all to one")
    from zcbench.suites.executor import _version

    out_dir = Path(out_dir)
    matrix: dict[str, Any] = {
        "kind": "zcbench-conformance-matrix",
        "schema_version": 2,
        "suite_version": _version("zcbench"),
        "suite_fingerprint": _fingerprint(),
        "command": list(command or sys.argv),
        "created": _now(),
        "finished": None,
        "complete": False,
        "profile": PROFILES[profile],
        "select": select,
        "machine": machine_info(),
        "implementations": {},
    }
    from zcbench.suites.executor import select_checks

    checks = select_checks(select)
    order = [c.id for c in checks]
    per_impl = len(order)
    # Checks that judge durations (``timed``) must not run beside another implementation's run:
    # with jobs, the implementations go in batches, each behind a TimedGate (see the module's doc).
    gated = jobs > 1 and len(impls) > 1 and any(c.timed for c in checks)
    batches = [impls[i : i + jobs] for i in range(0, len(impls), jobs)] if gated else [impls]
    columns: dict[str, dict[str, Any]] = {}
    lock = threading.Lock()

    def one(name: str, gate: TimedGate | None) -> None:
        column = run_one(name, select=select, profile=profile, timeout_s=timeout_s, gate=gate,
                         expected_failures=(expected_failures or {}).get(name), ray_address=ray_address, progress=bar)  # fmt: skip
        column["results"].sort(key=lambda r: order.index(r["check_id"]))  # the timed ones ran last
        with lock:
            columns[name] = column
            matrix["implementations"] = {n: columns[n] for n in impls if n in columns}
            write(matrix, out_dir)

    from .estimate import conformance_seconds  # imports torch (the model zoo): only where an estimate is made

    # The estimate before the first verdicts: a whole run's time, scaled by the share of the checks selected.
    expected_s = conformance_seconds(len(impls), jobs) * per_impl / max(1, _expected_checks(None))
    with Progress("conformance", total=per_impl * len(impls), expected_s=expected_s) as bar:
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            for batch in batches:
                gate = TimedGate(batch) if gated else None
                for f in [pool.submit(one, name, gate) for name in batch]:
                    f.result()
        except BaseException:  # Ctrl-C or a kill -TERM: what was judged is saved, the children end with us
            pool.shutdown(wait=False, cancel_futures=True)
            for child in list(_LIVE):
                child.kill()
            with lock:
                write(matrix, out_dir)
            raise
        pool.shutdown()
    matrix["finished"] = _now()
    matrix["complete"] = list(matrix["implementations"]) == list(impls)
    write(matrix, out_dir)
    return matrix


def write(matrix: dict[str, Any], out_dir: Path) -> None:
    """Validate and write ``matrix.json`` and ``matrix.md`` atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    schema.write_atomic(out_dir / "matrix.json", matrix, kind="matrix")
    schema.write_text_atomic(out_dir / "matrix.md", to_markdown(matrix))


def _md(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(result: dict[str, Any]) -> str:
    status, reason = result["status"], _md(result.get("reason") or "")
    if status == "fail":
        return f"**FAIL**: {reason}"
    if status == "error":
        return f"ERROR: {reason}"
    if status == "skip":
        return f"skip: {reason}"
    if status == "xfail":
        return f"xfail: {reason}"
    return CELL.get(status, status)


def headline(column: dict[str, Any]) -> str:
    """One line per implementation: version and counts, or why its run did not finish."""
    name = column["implementation"]
    c = column.get("counts") or counts(column["results"])
    parts = [f"{c[s]} {s}" for s in STATUSES if c.get(s)]
    version = (column.get("header") or {}).get("version", "?")
    line = f"**{name}** {version}: {', '.join(parts) or 'no checks'} ({column['provenance']['duration_s']:.0f} s)"
    if column["status"] != "ok":
        line += f" — run {column['status'].upper()}: {_md(column.get('reason') or '', 300)}"
    return line


def to_markdown(matrix: dict[str, Any]) -> str:
    """The matrix as Markdown: provenance, headlines, a legend, then one row per check and one column per implementation."""
    columns = matrix["implementations"]
    names = list(columns)
    check_ids: list[str] = []
    for col in columns.values():
        for r in col["results"]:
            if r["check_id"] not in check_ids:
                check_ids.append(r["check_id"])
    lines = [
        "# zcbench conformance matrix",
        "",
        f"Suite {matrix['suite_version']}, fingerprint `{matrix['suite_fingerprint']}`, profile {matrix['profile']}, "
        f"{matrix['created']} to {matrix['finished'] or '(unfinished)'}"
        + (f", checks selected: {', '.join(matrix['select'])}" if matrix.get("select") else "")
        + ("" if matrix["complete"] else " — **INCOMPLETE**: not every implementation has its column"),
        f"Machine: {_machine_line(matrix['machine'])}, GPU: {', '.join(matrix['machine'].get('gpus') or []) or 'none'}",
        f"Command: `{' '.join(matrix['command'])}`",
        "",
        *[f"- {headline(columns[n])}" for n in names],
        "",
        "Statuses: pass; **FAIL** (the implementation broke the property); ERROR (the check could not run:"
        " infrastructure, retried once on a fresh cluster, never counted as a failure); skip (capability not"
        " declared, or hardware absent); xfail/XPASS (expected failures of the implementation's authors).",
        "",
        "| check | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for cid in check_ids:
        cells = []
        for n in names:
            col = columns[n]
            hit = next((r for r in col["results"] if r["check_id"] == cid), None)
            cells.append(_cell(hit) if hit else f"not run ({col['status']})")
        lines.append(f"| `{cid}` | " + " | ".join(cells) + " |")
    if not check_ids:
        lines.append("| (no results) | " + " | ".join(columns[n]["status"] for n in names) + " |")
    lines += ["", "## Provenance per implementation", "", "| implementation | commit | fingerprint | started | finished | retries | run |", "|---|---|---|---|---|---|---|"]
    for n in names:
        p = columns[n]["provenance"]
        commit = f"{(p['commit'] or '?')[:12]}{' (dirty)' if p['dirty'] else ''}"
        lines.append(f"| {n} | {commit} | `{p['suite_fingerprint']}` | {p['started']} | {p['finished']} | {p['retries']} | {columns[n]['status']} |")
    return "\n".join(lines) + "\n"


def _xfails_arg(values: list[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--xfails wants IMPL=FILE, got {v!r}")
        out[name] = path
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zcbench conformance`` (also used by ``python -m zcbench.harness.conformance``)."""
    parser.add_argument("--impl", action="append", default=[], metavar="NAME_OR_SPEC", help="implementation (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("results/conformance"), help="directory for matrix.json and matrix.md")
    parser.add_argument("--select", action="append", metavar="ID_OR_PREFIX", help="only these checks (repeatable)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="ci", help="hypothesis profile")
    parser.add_argument("--xfails", action="append", metavar="IMPL=FILE", help="expected failures for one implementation")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds per implementation")
    parser.add_argument("--jobs", type=int, default=1, help="implementations run at a time, each with its own private Ray cluster")
    parser.add_argument("--ray-address", metavar="ADDRESS", help="attach every run to this Ray cluster (default: a private one each)")
    parser.add_argument("--one", metavar="NAME_OR_SPEC", help=argparse.SUPPRESS)  # the per-implementation subprocess
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gate", action="store_true", help=argparse.SUPPRESS)  # timed checks last, after a "go" on stdin


def _run_one_here(args: argparse.Namespace) -> int:
    """Inside the subprocess: run the checks in this process, reporting and saving after each."""
    import warnings

    from zcbench.suites import executor
    from zcbench.suites.contract import load_implementation

    xfails_file = _xfails_arg(args.xfails).get(args.one)
    impl = load_implementation(args.one)
    try:
        executor.apply_driver_env(impl)
    except executor.DriverEnvError:
        args.json.write_text(json.dumps({"needs_env": dict(impl.capabilities.worker_env)}))
        return NEEDS_ENV_EXIT
    proto = sys.stdout
    sys.stdout = sys.stderr  # libraries that print must not corrupt the verdict lines
    payload: dict[str, Any] = {"header": executor.header(impl, expected_failures=xfails_file), "results": [], "warnings": []}

    def on_result(i: int, n: int, result: executor.CheckResult) -> None:
        payload["results"].append(result.to_dict())
        schema.write_text_atomic(args.json, json.dumps(payload, default=str))
        proto.write(json.dumps({"check_id": result.check_id, "status": result.status, "i": i, "n": n}) + "\n")
        proto.flush()

    def hold_timed() -> None:
        proto.write(json.dumps(GATE_LINE) + "\n")
        proto.flush()
        sys.stdin.readline()  # "go", or the end of the pipe: the matrix is gone and so are we, soon

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", executor.StaleExpectedFailures)
        executor.run_checks(impl, select=args.select, expected_failures=xfails_file, ray_address=args.ray_address,
                            progress=on_result, hold_timed=hold_timed if args.gate else None)  # fmt: skip
    payload["warnings"] = [str(w.message) for w in caught if issubclass(w.category, executor.StaleExpectedFailures)]
    schema.write_text_atomic(args.json, json.dumps(payload, default=str))
    from zcbench.suites import session

    session.reset()  # disconnect, then stop the cluster: in that order, the exit status stays 0
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the matrix (or, with ``--one``, one implementation in this process); 1 if an implementation's run did not finish."""
    if args.one:
        if args.json is None:
            raise SystemExit("--one needs --json FILE")
        os.environ["ZCBENCH_PROFILE"] = PROFILES[args.profile]
        return _run_one_here(args)
    if not args.impl:
        raise SystemExit("name at least one implementation with --impl")
    matrix = run_matrix(
        args.impl, args.out, select=args.select, profile=args.profile, expected_failures=_xfails_arg(args.xfails),
        timeout_s=args.timeout, ray_address=args.ray_address, command=["zcbench", *sys.argv[1:]], jobs=args.jobs,
    )  # fmt: skip
    for col in matrix["implementations"].values():
        print(headline(col).replace("**", ""))
    print(f"wrote {args.out / 'matrix.json'} and {args.out / 'matrix.md'}")
    return 0 if all(c["status"] == "ok" for c in matrix["implementations"].values()) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m zcbench.harness.conformance", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
