"""What ``results/gpu/run_gpu_check.sh`` needs besides the bundle: the import shim, checks, and the run's summary.

The lent machine's Python (3.12, torch 2.11) is outside what pyproject allows, and it
has no network, so the project is not pip-installed there: :func:`make_shim` builds a
folder that makes ``zcbench.*`` importable straight from the checkout (links per
``package-dir`` entry, plus a ``.dist-info`` so the pytest plugin and version lookups
work). :func:`summarize` turns the steps' records and outputs into ``summary.json`` and
the lines a human pastes into the commit note. Stdlib only; runs as a plain script::

    python3 harness/device_run.py shim --dest /tmp/zcbench-shim
    python3 harness/device_run.py deps --site /tmp/site
    python3 harness/device_run.py summarize --out "$OUT" --steps steps.tsv --log-dir "$TMP"
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path
from typing import Any

try:
    from . import device_bundle as bundle
except ImportError:  # run as a script: harness/ is sys.path[0]
    import device_bundle as bundle  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parent.parent
#: The whole run must end within this (the device call's own limit is 10 minutes).
TOTAL_BUDGET_S = 480
#: Files that come back from $OUT (at most 8, at most 2 folders deep).
OUT_FILES = (
    "summary.json",
    "tests.txt",
    "conformance.txt",
    "controls.txt",
    "gpu_check.txt",
    "conformance/matrix.json",
    "gpu_check.json",
    "gpu_check.md",
)
MAX_OUT_FILES = 8


# --- the import shim -----------------------------------------------------------------------


def _pyproject(repo: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads((repo / "pyproject.toml").read_text())


SHIM_INIT = '''"""Import shim for the device run (written by harness/device_run.py): zcbench.<sub> is the checkout's folder.

pyproject's package-dir mapping without installing the project. Each mapped package is
loaded from the checkout itself, so every module's __file__ is a path in the checkout and
pytest finds the checkout's conftest.py files as it does with an editable install.
"""
import importlib.machinery
import importlib.util
import os
import sys

_DIRS = {dirs!r}


class _CheckoutFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        folder = _DIRS.get(name)
        if folder is None:
            return None
        init = os.path.join(folder, "__init__.py")
        if os.path.exists(init):
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[folder])
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec

    @staticmethod
    def invalidate_caches():
        pass


sys.meta_path.insert(0, _CheckoutFinder)
'''


def make_shim(repo: Path, dest: Path) -> Path:
    """Make ``dest`` an import root for the checkout: ``zcbench.<sub>`` loads each ``package-dir`` folder in place.

    ``dest/zcbench/__init__.py`` installs a finder for the mapped packages (see
    :data:`SHIM_INIT`); ``zcbench-<version>.dist-info`` carries the project's entry
    points, which load the pytest plugin (group ``pytest11``) and answer version
    lookups. Returns ``dest``; put it on ``PYTHONPATH``.
    """
    project = _pyproject(repo)
    package_dir: dict[str, str] = project["tool"]["setuptools"]["package-dir"]
    name, version = project["project"]["name"], project["project"]["version"]
    if dest.exists():
        shutil.rmtree(dest)
    top = {package.split(".")[0] for package in package_dir}
    if top != {name}:
        raise ValueError(f"package-dir maps {sorted(top)}; the shim makes only {name!r}")
    (dest / name).mkdir(parents=True)
    dirs = {package: str((repo / folder).resolve()) for package, folder in package_dir.items()}
    (dest / name / "__init__.py").write_text(SHIM_INIT.format(dirs=dirs))
    info = dest / f"{name}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "INSTALLER").write_text("zcbench-device-shim\n")
    groups = {"console_scripts": project["project"].get("scripts", {}), **project["project"].get("entry-points", {})}
    lines = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{k} = {v}" for k, v in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "RECORD").write_text("")
    return dest


# --- checks on the device ------------------------------------------------------------------


def unmet_requirements(site: Path) -> list[str]:
    """Requirements of the distributions installed in ``site`` that this interpreter cannot satisfy (name or version)."""
    import importlib.metadata as md

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement

    problems = []
    env = {"python_version": f"{sys.version_info[0]}.{sys.version_info[1]}", "extra": ""}
    for dist in md.distributions(path=[str(site)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            try:
                have = md.version(req.name)
            except md.PackageNotFoundError:
                problems.append(f"{dist.metadata['Name']} needs {req}: not installed")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{dist.metadata['Name']} needs {req}: {have} is installed")
    return sorted(set(problems))


def device_like_blocklist(ray_metadata: str, python_version: str, bundled: Iterable[str]) -> list[str]:
    """Top-level modules that Ray's ``default``/``data`` extras bring here but the device lacks.

    The dry run hides them (see :func:`write_device_like`) so Ray behaves as it will
    there, where only its core is installed. A module is hidden only if every
    distribution that provides it is absent on the device (``google`` stays: protobuf).
    """
    import importlib.metadata as md

    on_device = {bundle.normalize(n) for n in bundle.DEVICE_PACKAGES} | {bundle.normalize(n) for n in bundled}
    absent: set[str] = set()
    todo = [n for n in bundle.requirements(ray_metadata, python_version, ("default", "data")) if n not in on_device]
    while todo:  # the closure of what those extras pull in, still restricted to what the device lacks
        name = todo.pop()
        if name in absent:
            continue
        absent.add(name)
        try:
            needs = md.distribution(name).requires or []
        except md.PackageNotFoundError:
            continue
        meta = "".join(f"Requires-Dist: {r}\n" for r in needs)
        todo += [n for n in bundle.requirements(meta, python_version) if n not in on_device and n not in absent]
    hidden = []
    for module, dists in md.packages_distributions().items():
        if all(bundle.normalize(d) in absent for d in dists):
            hidden.append(module)
    return sorted(hidden)


SITECUSTOMIZE = '''"""Dry run only: modules the GPU machine does not have are not found (written by harness/device_run.py)."""
import importlib.machinery
import sys

_HIDDEN = frozenset({hidden!r})


class _DeviceLikePathFinder:
    """The path finder, except that it finds none of the hidden top-level modules.

    Replacing the path finder (rather than adding a finder that raises) keeps
    ``importlib.util.find_spec(name)`` answering None, as code that probes expects.
    """

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in _HIDDEN:
            return None
        return importlib.machinery.PathFinder.find_spec(name, path, target)

    @staticmethod
    def invalidate_caches():
        importlib.machinery.PathFinder.invalidate_caches()

    @staticmethod
    def find_distributions(*args, **kwargs):
        return importlib.machinery.PathFinder.find_distributions(*args, **kwargs)


sys.meta_path[:] = [_DeviceLikePathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


def write_device_like(dest: Path, hidden: Iterable[str]) -> Path:
    """Write ``dest/sitecustomize.py`` under which none of ``hidden`` is found, in every process that has ``dest`` on its path."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sitecustomize.py").write_text(SITECUSTOMIZE.format(hidden=sorted(hidden)))
    return dest


# --- budgets -------------------------------------------------------------------------------


def script_budgets(script_text: str) -> dict[str, int]:
    """The per-step budgets declared in the run script (``BUDGET_<STEP>=<seconds>`` lines)."""
    return {m[1].lower(): int(m[2]) for m in re.finditer(r"^BUDGET_([A-Z_]+)=(\d+)\s*(?:#.*)?$", script_text, re.M)}


def budget_problem(budgets: dict[str, int], total_s: int = TOTAL_BUDGET_S, reserve_s: int = 15) -> str | None:
    """None when the step budgets plus ``reserve_s`` (machine facts, summary) fit ``total_s``; else why not."""
    used = sum(budgets.values()) + reserve_s
    if not budgets:
        return "no BUDGET_<STEP>= lines found"
    if used > total_s:
        return f"step budgets {budgets} + {reserve_s} s reserve = {used} s > {total_s} s"
    return None


# --- summary -------------------------------------------------------------------------------


def read_steps(path: Path) -> list[dict[str, Any]]:
    """The run script's step records: one ``name<TAB>rc<TAB>seconds<TAB>budget<TAB>note`` line per step."""
    steps = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.strip():
            continue
        name, rc, seconds, budget, *note = line.split("\t")
        steps.append({"name": name, "rc": int(rc), "seconds": int(seconds), "budget_s": int(budget), "note": "\t".join(note)})
    return steps


def junit_outcomes(path: Path) -> dict[str, dict[str, str]]:
    """Per test id (``file::name``): outcome (passed/failed/error/skipped) and a short message, from pytest's JUnit XML."""
    if not path.exists():
        return {}
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name') or 'collection'}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = (child.get("message") or child.text or "").strip()
                message = text.splitlines()[0][:200] if text else ""
                break
        out[test_id] = {"outcome": outcome, "message": message, "seconds": case.get("time", "")}
    return out


#: The suite's check statuses (``pass``, ``fail``, ...; older matrices say ``passed``) in pytest's words.
CHECK_STATUS = {"pass": "passed", "fail": "failed", "skip": "skipped", "xfail": "xfailed", "xpass": "xpassed", "error": "error"}


def matrix_outcomes(path: Path) -> dict[str, dict[str, str]]:
    """Per check id: status (in pytest's words) and reason, from the conformance matrix.json (every implementation in it)."""
    if not path.exists():
        return {}
    matrix = json.loads(path.read_text())
    out = {}
    for impl, record in matrix.get("implementations", {}).items():
        if record.get("status") != "ok":
            out[f"{impl}:(run)"] = {"outcome": record.get("status", "crashed"), "message": str(record.get("reason", ""))[:200]}
        for r in record.get("results", []):
            status = CHECK_STATUS.get(r["status"], r["status"])
            out[f"{impl}:{r['check_id']}"] = {"outcome": status, "message": str(r.get("reason") or "")[:200]}
    return out


def step_verdict(name: str, rc: int, outcomes: dict[str, dict[str, str]], dry_run: bool, note: str = "") -> str:
    """``passed``, ``failed``, ``timeout``, ``missing``, ``skipped``, or ``no-gpu-run`` (all skipped on the device).

    On the device a step whose CUDA tests or checks were all skipped did not test
    anything, so it fails; in the dry run that is the expected outcome.
    """
    if note == "missing":
        return "missing"
    if rc in (124, 137):
        return "timeout"
    if rc != 0 or any(o["outcome"] in ("failed", "error", "crashed", "timeout") for o in outcomes.values()):
        return "failed"
    gpu = {k: o for k, o in outcomes.items() if _is_gpu_item(name, k)}
    if gpu and all(o["outcome"] == "skipped" for o in gpu.values()):
        return "skipped" if dry_run else "no-gpu-run"
    return "passed"


def _is_gpu_item(step: str, test_id: str) -> bool:
    """Which outcomes of a step need the GPU: the reference's ``test_gpu_*`` tests, the ``gpu.*`` checks."""
    tail = test_id.rsplit("::", 1)[-1].rsplit(":", 1)[-1]
    return tail.startswith(("test_gpu", "gpu.")) or step == "controls"


def _facts() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": sys.version.split()[0], "executable": sys.executable}
    for module in ("torch", "ray", "numpy"):
        try:
            mod = __import__(module)
            facts[module] = getattr(mod, "__version__", "?")
            if module == "ray":
                facts["ray_file"] = mod.__file__
        except Exception as exc:  # noqa: BLE001 - a fact we cannot read is reported, not fatal
            facts[module] = f"unavailable: {type(exc).__name__}"
    try:
        import torch

        facts["cuda"] = torch.version.cuda
        facts["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        facts["gpus"] = []
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError):
        facts["nvidia_smi"] = None
    return facts


def summarize(out: Path, steps_file: Path, log_dir: Path, dry_run: bool) -> dict[str, Any]:
    """Build the run's summary from the step records, pytest's JUnit files and the checks' JSON; write ``summary.json``."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes = {
        "tests": junit_outcomes(log_dir / "tests.xml"),
        "conformance": matrix_outcomes(out / "conformance" / "matrix.json"),
        "controls": junit_outcomes(log_dir / "controls.xml"),
    }
    gpu_check = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    steps = read_steps(steps_file)
    for s in steps:
        found = outcomes.get(s["name"], {})
        if s["name"] == "benchmark" and gpu_check is not None:
            found = {k: {"outcome": "failed" if v else "passed", "message": v or ""} for k, v in gpu_check.get("problems", {}).items()}
            if gpu_check.get("status") == "skipped":
                found = {"gpu.benchmark": {"outcome": "skipped", "message": gpu_check.get("reason", "")}}
        s["verdict"] = step_verdict(s["name"], s["rc"], found, dry_run, s["note"])
        counts: dict[str, int] = {}
        for o in found.values():
            counts[o["outcome"]] = counts.get(o["outcome"], 0) + 1
        s["counts"] = counts
    failing = [s["name"] for s in steps if s["verdict"] in ("failed", "timeout", "no-gpu-run")]
    summary = {
        "kind": "zcbench-gpu-check-run",
        "dry_run": dry_run,
        "machine": _facts(),
        "steps": steps,
        "outcomes": outcomes,
        "figures": (gpu_check or {}).get("figures", {}),
        "gpu_check_verdicts": (gpu_check or {}).get("verdicts", {}),
        "ok": not failing and bool(steps),
        "failing": failing,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def group_outcomes(items: dict[str, dict[str, str]]) -> str:
    """``2 passed: a, b; 1 failed: c (why)``: the items by outcome, each distinct reason once."""
    groups: dict[str, list[str]] = {}
    reasons: dict[str, list[str]] = {}
    for test_id, o in items.items():
        groups.setdefault(o["outcome"], []).append(test_id.rsplit("::", 1)[-1].split(":", 1)[-1])
        if o["outcome"] != "passed" and o["message"] and o["message"][:120] not in reasons.setdefault(o["outcome"], []):
            reasons[o["outcome"]].append(o["message"][:120])
    parts = []
    for outcome, names in groups.items():
        why = f" ({'; '.join(reasons[outcome])})" if reasons.get(outcome) else ""
        parts.append(f"{len(names)} {outcome}: {', '.join(names)}{why}")
    return "; ".join(parts)


def paste_block(summary: dict[str, Any]) -> str:
    """The lines for the commit or issue note: machine, each step's verdict and time, the figures, the verdicts."""
    m = summary["machine"]
    lines = [
        f"GPU check{' (CPU DRY RUN)' if summary['dry_run'] else ''}: {m.get('nvidia_smi') or 'no nvidia-smi'}; "
        f"Python {m.get('python')}, torch {m.get('torch')} (CUDA {m.get('cuda')}), Ray {m.get('ray')} from {m.get('ray_file')}",
        "steps: " + "; ".join(
            f"{s['name']} {s['verdict']} ({s['seconds']}/{s['budget_s']} s"
            + (", " + ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items())) if s.get("counts") else "") + ")"
            for s in summary["steps"]
        ),
    ]
    for step in ("tests", "conformance", "controls"):
        gpu_items = {k: o for k, o in summary["outcomes"].get(step, {}).items() if _is_gpu_item(step, k)}
        if gpu_items:
            lines.append(f"{step} (GPU): " + group_outcomes(gpu_items))
    for key, text in summary.get("figures", {}).items():
        lines.append(f"{key}: {text}")
    for key, v in summary.get("gpu_check_verdicts", {}).items():
        lines.append(f"verdict {key}: {({True: 'pass', False: 'FAIL', None: 'n/a'})[v.get('ok')]}: {v.get('text', '')}")
    lines.append("RESULT: " + ("OK" if summary["ok"] else f"FAILED ({', '.join(summary['failing']) or 'no steps ran'})"))
    return "\n".join(lines)


def trim_out(out: Path, keep: Iterable[str] = OUT_FILES, limit: int = MAX_OUT_FILES) -> list[str]:
    """Remove files under ``out`` that are not planned (only ``limit`` come back); returns what was removed.

    Planned files are kept whatever else appeared, so the ones that matter are the
    ones that come back.
    """
    keep = set(keep)
    removed = []
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel not in keep:
            removed.append(rel)
            p.unlink()
    for p in sorted(out.rglob("*"), reverse=True):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()
    left = [p for p in out.rglob("*") if p.is_file()]
    if len(left) > limit:  # only if OUT_FILES itself grew past the limit
        raise RuntimeError(f"{len(left)} files under {out}, more than the {limit} that come back")
    return removed


def main(argv: list[str] | None = None) -> int:
    """CLI: ``shim``, ``deps``, ``device-like``, ``budgets``, ``summarize``."""
    parser = argparse.ArgumentParser(prog="device_run", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("shim", help="make an import root for zcbench.* from this checkout")
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("deps", help="requirements of the wheels in SITE that this interpreter does not satisfy")
    p.add_argument("--site", type=Path, required=True)
    p = sub.add_parser("device-like", help="dry run: write a sitecustomize that hides what the device lacks")
    p.add_argument("--dest", type=Path, required=True)
    p.add_argument("--site", type=Path, required=True, help="the bundle's install target (its ray defines the extras)")
    p = sub.add_parser("budgets", help="check the run script's step budgets against the total")
    p.add_argument("script", type=Path)
    p = sub.add_parser("summarize", help="write summary.json, trim OUT to the files that come back, print the note")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=Path, required=True)
    p.add_argument("--log-dir", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "shim":
        print(make_shim(REPO, args.dest))
    elif args.command == "deps":
        problems = unmet_requirements(args.site)
        print("\n".join(problems) if problems else "every requirement of the bundle is met")
        return 1 if problems else 0
    elif args.command == "device-like":
        import importlib.metadata as md

        dists = list(md.distributions(path=[str(args.site)]))
        ray_meta = next(d for d in dists if bundle.normalize(d.metadata["Name"]) == "ray").read_text("METADATA") or ""
        version = f"{sys.version_info[0]}.{sys.version_info[1]}"
        hidden = device_like_blocklist(ray_meta, version, [d.metadata["Name"] for d in dists])
        write_device_like(args.dest, hidden)
        print(f"hidden in the dry run (not on the device): {', '.join(hidden) or 'nothing'}")
    elif args.command == "budgets":
        budgets = script_budgets(args.script.read_text())
        problem = budget_problem(budgets)
        print(problem or f"budgets {budgets}: {sum(budgets.values())} s of {TOTAL_BUDGET_S} s")
        return 1 if problem else 0
    else:
        summary = summarize(args.out, args.steps, args.log_dir, args.dry_run)
        removed = trim_out(args.out)
        if removed:
            print(f"removed from {args.out} (only {MAX_OUT_FILES} planned files come back): {', '.join(removed)}")
        print("=" * 30 + " paste into the note " + "=" * 30)
        print(paste_block(summary))
        return 0 if summary["ok"] else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
