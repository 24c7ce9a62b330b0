"""The ``zcbench`` command: the main job, the benchmark matrix, its report, a comparison, conformance.

Exit codes: 0 success, 1 regression found (compare --fail-on-regression), some cells
failed or INVALID, or the reference failed conformance; 2 bad input (unknown
implementation/model/value, invalid results file, unreachable Ray address); 130
interrupted (finished cells are saved).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from pathlib import Path

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input from the command line; reported in one line with exit code 2."""


def _csv_ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _add_run(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser("run", help="run the benchmark matrix and write a results JSON")
    run.add_argument("--impl", action="append", help="implementation (registered name or module:factory); repeatable")
    run.add_argument("--model", action="append", type=_csv,
                     help="model: mlp-<N>mib, tensors-<N>, mixed, a real architecture, bert-base, or the set 'scale'; "
                          "repeatable or comma-separated")  # fmt: skip
    run.add_argument("--pool", type=_csv_ints, help="actor pool sizes, e.g. 1,2,4,8")
    run.add_argument("--batch", type=_csv_ints, help="batch sizes, e.g. 1,8,32,128")
    run.add_argument("--device", type=_csv, help="cpu and/or cuda (cuda only where available)")
    run.add_argument("--rounds", type=int, help="measured rounds per cell (median and spread over them)")
    run.add_argument("--warmup", type=int, help="unrecorded rounds per cell before the measured ones")
    run.add_argument("--steady-batches", type=int, help="steady-state batches each pool actor runs after its first two (default 20)")
    run.add_argument("--audit-batches", type=int, help="batches per round re-run in the driver and compared bit for bit (default 8)")
    run.add_argument("--rows", type=int, help="rows per round (default: enough for --steady-batches per actor)")
    run.add_argument("--seed", type=int, help="seed of the input rows")
    run.add_argument("--cell-timeout", type=float, help="seconds one round of one cell may take before it is failed")
    run.add_argument("--quick", action="store_true", help="the headline: every installed implementation, mlp-256mib, pools 2,1, batch 8, one round")
    run.add_argument("--full", action="store_true", help="the committed baseline's matrix: mlp-256mib, pools 1-8, batches 1-128, 3 rounds")
    run.add_argument("--ray-address", help="use this existing Ray cluster instead of starting a private one")
    run.add_argument("--nodes", type=int, help="simulate this many nodes (each with its own object store) in the private cluster")
    run.add_argument("--out", help="results file (default results/bench/run-<time>.json)")
    run.add_argument("--resume", metavar="FILE", help="complete an interrupted results file (keeps its settings and finished cells)")


def _add_main(sub: argparse._SubParsersAction) -> None:
    main = sub.add_parser("main", help="the main job: conformance of reference and naive, a benchmark with the headline, one summary")
    main.add_argument("--out", type=Path, default=Path("results/latest"), help="output directory")
    main.add_argument("--full", action="store_true", help="the full benchmark matrix (its expected duration is printed first)")
    main.add_argument("--impl", action="append", help="conformance implementations (default: reference, naive)")
    main.add_argument("--skip-conformance", action="store_true", help="benchmark only")
    main.add_argument("--skip-bench", action="store_true", help="conformance only")
    main.add_argument("--ray-address", help="use this existing Ray cluster")


def build_parser(load_conformance: bool = True) -> argparse.ArgumentParser:
    """The argument parser; the conformance subcommand's options are loaded only when asked for."""
    parser = argparse.ArgumentParser(prog="zcbench", description="Zero-copy model sharing in Ray: benchmark and conformance.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_main(sub)
    _add_run(sub)
    rep = sub.add_parser("report", help="write Markdown and PNG plots from a results file")
    rep.add_argument("results")
    rep.add_argument("--out", required=True, help="output directory")
    cmp_ = sub.add_parser("compare", help="compare two results files side by side")
    cmp_.add_argument("a", help="baseline results")
    cmp_.add_argument("b", help="new results")
    cmp_.add_argument("--factor", type=float, default=1.2, help="flag a regression when worse by this factor (default 1.2)")
    cmp_.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged")
    conf = sub.add_parser("conformance", help="run the conformance matrix")
    if load_conformance:
        from . import conformance

        conformance.add_arguments(conf)
    else:
        conf.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def check_ray_address(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast when ``host:port`` does not accept a connection (ray.init would wait much longer)."""
    if address == "auto":
        return  # ray.init resolves it from the local session file
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as exc:
        raise UsageError(f"Ray address {address!r} does not answer: {exc}") from None


def settings_from_args(args: argparse.Namespace, installed: list[str] | None = None):
    """The matrix settings ``zcbench run`` asks for, validated (UsageError on bad input)."""
    from zcbench.suites.contract import ContractError, resolve_spec

    from . import bench, matrix

    if args.quick or args.full:
        if installed is None:  # --impl names them: no need to import every adapter to find what is installed
            installed = list(dict.fromkeys(args.impl)) if args.impl else bench.installed_impls()
        s = matrix.full_settings(installed) if args.full else matrix.quick_settings(installed)
    else:
        s = matrix.default_settings()
    if args.impl:
        s.impls = list(dict.fromkeys(args.impl))
    if args.model:
        s.models = matrix.expand_models([m for group in args.model for m in group])
    for attr, value in (("pools", args.pool), ("batches", args.batch), ("devices", args.device), ("rounds", args.rounds),
                        ("warmup", args.warmup), ("rows", args.rows), ("seed", args.seed), ("cell_timeout_s", args.cell_timeout),
                        ("steady_batches", args.steady_batches), ("audit_batches", args.audit_batches),
                        ("nodes", args.nodes)):  # fmt: skip
        if value is not None:
            setattr(s, attr, value)
    s.ray_address = args.ray_address
    for name in s.impls:
        try:
            resolve_spec(name)
        except ContractError as exc:
            raise UsageError(str(exc)) from None
    try:
        matrix.validate(s)
    except matrix.MatrixError as exc:
        raise UsageError(str(exc)) from None
    return s


def cmd_run(args: argparse.Namespace) -> int:
    from zcbench.suites.contract import ContractError

    from . import bench, schema
    from .matrix import Settings

    if args.resume:
        try:
            doc = schema.load(args.resume)
        except schema.ResultsError as exc:
            raise UsageError(str(exc)) from None
        out = Path(args.out or args.resume)
        settings = Settings.from_dict(doc["settings"])
        if args.ray_address:
            doc["settings"]["ray_address"] = settings.ray_address = args.ray_address
    else:
        settings = settings_from_args(args)
        out = Path(args.out or f"results/bench/run-{time.strftime('%Y%m%d-%H%M%S')}.json")
        try:
            infos = bench.implementation_info(settings.impls)
        except ContractError as exc:
            raise UsageError(str(exc)) from None
        doc = bench.new_document(settings, infos, ["zcbench", *sys.argv[1:]])
    if settings.ray_address:
        check_ray_address(settings.ray_address)
    try:
        bench.execute(doc, out)
    except KeyboardInterrupt:
        print(f"zcbench: interrupted; finished cells kept in {out}; complete it with: zcbench run --resume {out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConnectionError as exc:
        raise UsageError(str(exc)) from None
    failed = [c for c in doc["cells"] if c["status"] == "failed"]
    print(f"zcbench: wrote {out} ({len(doc['cells']) - len(failed)} cells final, {len(failed)} failed) in {doc['wall_s']:.0f}s", file=sys.stderr)
    return 1 if failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from . import report, schema

    try:
        doc = schema.load(args.results)
        paths = report.write_report(doc, Path(args.out))
    except (schema.ResultsError, report.ReportError) as exc:
        raise UsageError(str(exc)) from None
    for p in paths:
        print(p)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from . import compare, schema

    try:
        a, b = schema.load(args.a), schema.load(args.b)
    except schema.ResultsError as exc:
        raise UsageError(str(exc)) from None
    result = compare.compare(a, b, args.factor)
    print(compare.render(result, args.a, args.b, args.factor))
    return 1 if (args.fail_on_regression and result.regressions) else 0


def cmd_main(args: argparse.Namespace) -> int:
    from . import main_job, matrix

    if args.ray_address:
        check_ray_address(args.ray_address)
    s = main_job.JobSettings(
        out=args.out, full=args.full, conformance_impls=list(args.impl or main_job.CONFORMANCE_IMPLS),
        conformance=not args.skip_conformance, benchmark=not args.skip_bench, ray_address=args.ray_address,
    )  # fmt: skip
    try:
        return main_job.main_job(s)
    except matrix.MatrixError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        print(f"zcbench main: interrupted; finished parts kept under {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED


def cmd_conformance(args: argparse.Namespace) -> int:
    from . import conformance

    try:
        return int(conformance.main(args) or 0)
    except KeyboardInterrupt:
        print(f"zcbench conformance: interrupted; what was judged is kept in {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``zcbench`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    # A kill -TERM (a CI job's time-out, a scheduler) ends a run as Ctrl-C does: what was
    # measured is saved and the measuring subprocesses and their Ray clusters end too,
    # instead of outliving this process.
    signal.signal(signal.SIGTERM, _interrupt)
    # Local test clusters need no token auth (Ray 2.60 enables it by default); every
    # measuring subprocess inherits these before it imports ray.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The conformance module (and what it imports) is loaded only for that subcommand.
    args = build_parser(load_conformance=bool(argv) and argv[0] == "conformance").parse_args(argv)
    handler = {"main": cmd_main, "run": cmd_run, "report": cmd_report, "compare": cmd_compare, "conformance": cmd_conformance}[args.command]
    try:
        return handler(args)
    except UsageError as exc:
        print(f"zcbench {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
