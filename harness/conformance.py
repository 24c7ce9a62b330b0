"""The conformance matrix: every implementation × every check, one subprocess per implementation.

Each implementation runs in its own Python process with its ``worker_env`` exported
before anything imports ray (Ray reads ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS`` at import),
and one crash or hang cannot take the others' results with it::

    zcbench conformance --impl reference --impl naive --out results/conformance
    python -m zcbench.harness.conformance --impl reference --select outputs.
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
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from .machine import git_commit, machine_info

SCHEMA_VERSION = 1
PROFILES = {"ci": "zcbench-ci", "thorough": "zcbench-thorough"}
DEFAULT_TIMEOUT_S = 3600.0
CELL = {"passed": "pass", "xfailed": "xfail", "xpassed": "XPASS"}


def _suite_version() -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version("zcbench")
    except importlib.metadata.PackageNotFoundError:
        return None


def _tail(text: str | bytes | None, lines: int = 30) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


NEEDS_ENV_EXIT = 3  # the subprocess asks to be started again with the implementation's env


def run_one(
    impl: str,
    *,
    select: list[str] | None = None,
    profile: str = "ci",
    expected_failures: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run one implementation's checks in a subprocess; always return a record (status ok/crashed/timeout)."""
    start = time.perf_counter()
    record: dict[str, Any] = {"implementation": impl, "status": "crashed", "header": None, "results": []}
    env = {**os.environ, "ZCBENCH_PROFILE": PROFILES[profile]}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="zcbench-conformance-") as tmp:
        out = Path(tmp) / "one.json"
        cmd = [sys.executable, "-m", "zcbench.harness.conformance", "--one", impl, "--json", str(out)]
        for s in select or []:
            cmd += ["--select", s]
        if expected_failures:
            cmd += ["--xfails", f"{impl}={expected_failures}"]
        if ray_address:
            cmd += ["--ray-address", ray_address]
        # The adapter's worker_env is only known once it is imported, and importing it may
        # import ray: the subprocess then says which env it needs and is started again with it.
        for _attempt in range(2):
            rc, stderr = _launch(cmd, env, timeout_s)
            if rc == NEEDS_ENV_EXIT and out.exists():
                env.update(json.loads(out.read_text())["needs_env"])
                out.unlink()
                continue
            break
        record["returncode"] = rc
        if rc is None:
            record.update(status="timeout", reason=f"no result after {timeout_s:.0f} s", stderr_tail=_tail(stderr))
        elif rc == 0 and out.exists():
            record.update(json.loads(out.read_text()), status="ok")
        else:
            record.update(
                reason=f"subprocess exited with status {rc}: {_tail(stderr, 1)}",
                stderr_tail=_tail(stderr),
            )
    record["duration_s"] = time.perf_counter() - start
    return record


def _launch(cmd: list[str], env: dict[str, str], timeout_s: float) -> tuple[int | None, bytes]:
    """Run ``cmd``; return (exit status or None on timeout, stderr)."""
    # Own session, so a timeout kills the run's Ray processes too.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout_s)
        return proc.returncode, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        return None, stderr


def run_matrix(
    impls: list[str],
    out_dir: Path,
    select: list[str] | None = None,
    profile: str = "ci",
    *,
    expected_failures: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run every implementation, write ``matrix.json`` and ``matrix.md`` under ``out_dir``, return the matrix."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {sorted(PROFILES)}")
    started = dt.datetime.now(dt.timezone.utc)
    records = {
        name: run_one(
            name,
            select=select,
            profile=profile,
            expected_failures=(expected_failures or {}).get(name),
            timeout_s=timeout_s,
            ray_address=ray_address,
        )
        for name in impls
    }
    matrix = {
        "schema_version": SCHEMA_VERSION,
        "kind": "zcbench-conformance-matrix",
        "suite_version": _suite_version(),
        "git": git_commit(),
        "machine": machine_info(),
        "created": started.isoformat(timespec="seconds"),
        "profile": PROFILES[profile],
        "select": select,
        "implementations": records,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "matrix.json").write_text(json.dumps(matrix, indent=2, default=str) + "\n")
    (out_dir / "matrix.md").write_text(to_markdown(matrix))
    return matrix


def _cell(result: dict[str, Any]) -> str:
    status, reason = result["status"], _md(result.get("reason") or "")
    if status == "failed":
        return f"**FAIL**: {reason}"
    if status == "skipped":
        return f"skip: {reason}"
    return CELL.get(status, status)


def _md(text: str, limit: int = 140) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def headline(record: dict[str, Any]) -> str:
    """One line per implementation: version and counts, or why it has no results."""
    name = record["implementation"]
    if record["status"] != "ok":
        return f"**{name}**: {record['status'].upper()}: {_md(record.get('reason', ''), 300)}"
    counts = Counter(r["status"] for r in record["results"])
    parts = [f"{counts[s]} {s}" for s in ("passed", "failed", "xfailed", "xpassed", "skipped") if counts[s]]
    version = (record.get("header") or {}).get("version", "?")
    return f"**{name}** {version}: {', '.join(parts) or 'no checks'} ({record.get('duration_s', 0):.0f} s)"


def to_markdown(matrix: dict[str, Any]) -> str:
    """The matrix as Markdown: headlines, then a table with one row per check and one column per implementation."""
    records = matrix["implementations"]
    names = list(records)
    check_ids: list[str] = []
    for rec in records.values():
        for r in rec["results"]:
            if r["check_id"] not in check_ids:
                check_ids.append(r["check_id"])
    m = matrix["machine"]
    git = matrix.get("git") or {}
    lines = [
        "# zcbench conformance matrix",
        "",
        f"Suite {matrix['suite_version']}, commit {git.get('sha') or '?'}{' (dirty)' if git.get('dirty') else ''}, "
        f"{matrix['created']}, profile {matrix['profile']}"
        + (f", checks selected: {', '.join(matrix['select'])}" if matrix.get("select") else ""),
        f"Machine: {m.get('cpu_model')}, {m.get('cores_logical')} logical cores, "
        f"{m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM, GPU: {', '.join(m.get('gpus') or []) or 'none'}",
        "",
        *[f"- {headline(records[n])}" for n in names],
        "",
        "| check | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for cid in check_ids:
        cells = []
        for n in names:
            rec = records[n]
            hit = next((r for r in rec["results"] if r["check_id"] == cid), None)
            cells.append(_cell(hit) if hit else ("—" if rec["status"] == "ok" else rec["status"]))
        lines.append(f"| `{cid}` | " + " | ".join(cells) + " |")
    if not check_ids:
        lines.append("| (no results) | " + " | ".join(records[n]["status"] for n in names) + " |")
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
    parser.add_argument("--ray-address", metavar="ADDRESS", help="attach every run to this Ray cluster (default: a private one each)")
    parser.add_argument("--one", metavar="NAME_OR_SPEC", help=argparse.SUPPRESS)  # the per-implementation subprocess
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)


def _run_one_here(args: argparse.Namespace) -> int:
    """Inside the subprocess: run the checks in this process and write header + results."""
    from zcbench.suites import runner

    from zcbench.suites.contract import load_implementation

    xfails_file = _xfails_arg(args.xfails).get(args.one)
    impl = load_implementation(args.one)
    try:
        runner.apply_driver_env(impl)
    except runner.DriverEnvError:
        args.json.write_text(json.dumps({"needs_env": dict(impl.capabilities.worker_env)}))
        return NEEDS_ENV_EXIT
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", runner.StaleExpectedFailures)
        results = runner.run_checks(
            impl, select=args.select, expected_failures=xfails_file, ray_address=args.ray_address
        )
    stale = [str(w.message) for w in caught if issubclass(w.category, runner.StaleExpectedFailures)]
    for msg in stale:
        print(f"warning: {msg}", file=sys.stderr)
    payload = {
        "header": runner.header(impl, expected_failures=xfails_file),
        "results": [r.to_dict() for r in results],
        "warnings": stale,
    }
    args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


def main(args: argparse.Namespace) -> int:
    """Run the matrix (or, with ``--one``, one implementation in this process); 1 if an implementation crashed."""
    if args.one:
        if args.json is None:
            raise SystemExit("--one needs --json FILE")
        return _run_one_here(args)
    if not args.impl:
        raise SystemExit("name at least one implementation with --impl")
    matrix = run_matrix(
        args.impl,
        args.out,
        select=args.select,
        profile=args.profile,
        expected_failures=_xfails_arg(args.xfails),
        timeout_s=args.timeout,
        ray_address=args.ray_address,
    )
    for rec in matrix["implementations"].values():
        print(headline(rec).replace("**", ""))
    print(f"wrote {args.out / 'matrix.json'} and {args.out / 'matrix.md'}")
    return 0 if all(r["status"] == "ok" for r in matrix["implementations"].values()) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m zcbench.harness.conformance", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
