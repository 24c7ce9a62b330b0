"""The device bundle and the device run's plumbing, without a GPU: wheels, sizes, shim, budgets, summary.

Synthetic wheels stand in for Ray's where the question is the repack's logic; one test
builds the real cp311 bundle from PyPI (skipped when the download fails: offline) and
imports Ray from a ``--target`` install of it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from zcbench.harness import device_bundle as db
from zcbench.harness import device_run as dr

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "results" / "gpu" / "run_gpu_check.sh"
MiB = 2**20

RAY_METADATA = """Metadata-Version: 2.4
Name: ray
Version: 2.60.0
Requires-Python: >=3.10
Requires-Dist: click>=7.0
Requires-Dist: filelock
Requires-Dist: jsonschema
Requires-Dist: msgpack<2.0.0,>=1.0.0
Requires-Dist: packaging>=24.2
Requires-Dist: protobuf>=3.20.3
Requires-Dist: pyyaml
Requires-Dist: requests
Requires-Dist: numpy>=1.20; extra == "data"
Requires-Dist: pydantic<3,>=2.5.0; python_version < "3.14" and extra == "default"
Requires-Dist: py-spy>=0.4.0; python_version >= "3.12" and extra == "default"
Requires-Dist: py-spy>=0.2.0; python_version < "3.12" and extra == "default"
"""


def _fake_wheel(path: Path, extra_members: dict[str, bytes] | None = None) -> Path:
    """A small Ray-shaped wheel: Python files, an executable, jars, the dashboard client, a signed RECORD."""
    members = {
        "ray/__init__.py": b"__version__ = '2.60.0'\n",
        "ray/core/src/ray/raylet/raylet": b"\x7fELF fake binary",
        "ray/jars/ray_dist.jar": b"J" * 5000,
        "ray/dashboard/client/build/index.html": b"<html></html>",
        "ray/dashboard/client/build/static/js/main.js": b"x" * 3000,
        "ray/dashboard/modules/job/job_head.py": b"# imported by Python: kept\n",
        "ray-2.60.0.dist-info/METADATA": RAY_METADATA.encode(),
        "ray-2.60.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: cp311-cp311-linux_x86_64\n",
        **(extra_members or {}),
    }
    rows = [[n, db.record_hash(d), str(len(d))] for n, d in members.items()] + [["ray-2.60.0.dist-info/RECORD", "", ""]]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, (2026, 1, 1, 0, 0, 0))
            info.external_attr = (stat.S_IFREG | (0o755 if name.endswith("raylet") else 0o644)) << 16
            zf.writestr(info, data)
        zf.writestr("ray-2.60.0.dist-info/RECORD", buf.getvalue())
        zf.writestr("ray-2.60.0.dist-info/RECORD.jws", b"signature of the old RECORD")
    return path


# --- names, requirements --------------------------------------------------------------------


def test_names_and_tags():
    assert db.normalize("Rpds_Py") == db.normalize("rpds.py") == "rpds-py"
    assert db.python_tag("3.12") == "cp312" and db.python_tag("3.11.7") == "cp311"
    assert db.dist_name("rpds_py-2026.9.1-cp312-cp312-manylinux_2_17_x86_64.whl") == "rpds-py"
    assert db.python_compatible("ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl", "3.12")
    assert not db.python_compatible("ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl", "3.12")
    assert db.python_compatible("six-1.17.0-py2.py3-none-any.whl", "3.12")


def test_requirements_follow_markers_and_extras():
    assert db.requirements(RAY_METADATA, "3.12") == sorted(
        ["click", "filelock", "jsonschema", "msgpack", "packaging", "protobuf", "pyyaml", "requests"])
    with_default = db.requirements(RAY_METADATA, "3.12", ("default",))
    assert "pydantic" in with_default and "py-spy" in with_default and "numpy" not in with_default


def test_ray_core_needs_only_what_the_bundle_adds():
    """Ray's core needs jsonschema, which the device lacks; with it and its own needs bundled nothing is missing."""
    assert "jsonschema" not in db.DEVICE_PACKAGES
    core_only = {"ray": RAY_METADATA}
    assert db.missing_requirements(core_only, db.DEVICE_PACKAGES, "3.12") == {"ray": ["jsonschema"]}
    bundled = {**core_only, "jsonschema": "Requires-Dist: attrs>=22.2.0\nRequires-Dist: referencing>=0.28.4\n"
               "Requires-Dist: rpds-py>=0.25.0\nRequires-Dist: jsonschema-specifications>=2023.03.6\n",
               "referencing": "Requires-Dist: rpds-py>=0.7.0\nRequires-Dist: typing-extensions>=4.4.0; python_version < '3.13'\n",
               "rpds-py": "", "jsonschema-specifications": "Requires-Dist: referencing>=0.31.0\n"}
    assert db.missing_requirements(bundled, db.DEVICE_PACKAGES, "3.12") == {}
    assert set(db.PINS) == set(bundled)


# --- repacking -------------------------------------------------------------------------------


def test_repack_drops_jars_and_client_and_writes_a_valid_record(tmp_path):
    src = _fake_wheel(tmp_path / "ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl")
    assert db.verify_wheel(src) == [
        "ray/jars/ray_dist.jar: should have been removed",
        "ray/dashboard/client/build/index.html: should have been removed",
        "ray/dashboard/client/build/static/js/main.js: should have been removed",
        "ray-2.60.0.dist-info/RECORD.jws: not listed in RECORD",
    ]
    dest = tmp_path / "out" / src.name
    dest.parent.mkdir()
    stats = db.repack_wheel(src, dest)
    assert (stats.removed_files, stats.removed_bytes) == (3, 5000 + 13 + 3000)
    assert db.verify_wheel(dest) == []
    with zipfile.ZipFile(dest) as zf:
        names = zf.namelist()
        assert "ray/dashboard/modules/job/job_head.py" in names and "ray-2.60.0.dist-info/RECORD.jws" not in names
        assert not [n for n in names if n.startswith(db.DROP_PREFIXES)]
        assert (zf.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16) & 0o111  # still executable
        assert names[-1] == "ray-2.60.0.dist-info/RECORD"


def test_verify_catches_a_record_that_lies(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl")
    clean = tmp_path / "clean.whl"
    db.repack_wheel(wheel, clean)
    tampered = tmp_path / "tampered.whl"
    with zipfile.ZipFile(clean) as zin, zipfile.ZipFile(tampered, "w") as zout:
        for info in zin.infolist():
            data = b"changed\n" if info.filename == "ray/__init__.py" else zin.read(info)
            zout.writestr(info, data)
        zout.writestr("ray/extra.py", b"")
    problems = db.verify_wheel(tampered)
    assert any(p.startswith("ray/__init__.py: RECORD says") for p in problems)
    assert "ray/extra.py: not listed in RECORD" in problems


def test_pip_installs_the_repacked_wheel_into_a_target(tmp_path):
    src = _fake_wheel(tmp_path / "ray-2.60.0-cp311-cp311-manylinux2014_x86_64.whl")
    dest = tmp_path / "bundle" / src.name
    dest.parent.mkdir()
    db.repack_wheel(src, dest)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), str(dest)], check=True, timeout=120)
    assert (site / "ray" / "__init__.py").exists() and not (site / "ray" / "jars").exists()
    assert os.stat(site / "ray/core/src/ray/raylet/raylet").st_mode & stat.S_IXUSR


# --- sizes -----------------------------------------------------------------------------------


def test_size_check_arithmetic():
    ok = db.SizeCheck(bundle_bytes=43 * MiB, tree_bytes=2 * MiB)
    assert ok.fits and ok.total_bytes == 45 * MiB and "fits, +19.0 MiB" in ok.describe()
    over = db.SizeCheck(bundle_bytes=63 * MiB, tree_bytes=2 * MiB)
    assert not over.fits and "OVER" in over.describe()
    assert db.SizeCheck(64 * MiB, 0).fits  # the limit itself still fits


def test_size_check_counts_what_travels(tmp_path):
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / "pkg" / "tracked.py").write_bytes(b"x" * 1000)
    (repo / ".gitignore").write_text("/.bundle/\n/ignored.bin\n")
    subprocess.run([*git, "add", "."], check=True)
    (repo / "untracked.txt").write_bytes(b"y" * 500)  # untracked, not ignored: travels
    (repo / "ignored.bin").write_bytes(b"z" * 10_000)  # ignored: stays
    bundle = repo / ".bundle" / "cp312"
    bundle.mkdir(parents=True)
    (bundle / "a.whl").write_bytes(b"w" * 3000)
    check = db.size_check(bundle, repo)
    tree = 1000 + 500 + len("/.bundle/\n/ignored.bin\n")
    assert (check.bundle_bytes, check.tree_bytes) == (3000, tree)
    assert not db.size_check(bundle, repo, limit_bytes=3000 + tree - 1).fits
    (repo / ".gitignore").write_text("/ignored.bin\n")  # the bundle now travels with the tree as well
    with pytest.raises(db.BundleError, match="not git-ignored"):
        db.size_check(bundle, repo)


def test_bundle_folder_is_ignored_in_this_repo():
    out = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", ".bundle/cp312/x.whl"])
    assert out.returncode == 0, "add /.bundle/ to .gitignore: the bundle must travel as a carried path only"


def test_real_bundle_builds_installs_and_imports(tmp_path):
    """The cp311 bundle from PyPI: repacked Ray valid, manifest right, fits with the tree, ray imports from --target."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        manifest = db.build(REPO, version, dest=tmp_path / "bundle", level=1)  # the fastest deflate: CI time
    except db.BundleError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"cannot download wheels here (offline?): {str(exc)[:200]}")
        raise
    wheels = {w["dist"]: w for w in manifest["wheels"]}
    assert set(wheels) == set(db.PINS)
    ray_wheel = tmp_path / "bundle" / wheels["ray"]["file"]
    assert db.verify_wheel(ray_wheel) == []
    with zipfile.ZipFile(ray_wheel) as zf:  # pip restores the executable bit only from a regular file's mode
        mode = zf.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16
        assert stat.S_ISREG(mode) and mode & 0o111
    assert wheels["ray"]["bytes"] < wheels["ray"]["repacked_from"]["bytes"] - 25 * MiB  # the jars alone are 31 MiB
    assert wheels["ray"]["sha256"] == db.sha256_file(ray_wheel)
    assert manifest["size"]["fits"] and json.loads((tmp_path / "bundle" / db.MANIFEST).read_text())["tag"] == db.python_tag(version)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, (tmp_path / "bundle").glob("*.whl"))],
                   check=True, timeout=300)
    code = "import ray, jsonschema; print(ray.__file__); print(ray.__version__)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out[0].startswith(str(site)) and out[1] == db.PINS["ray"]


# --- the shim and the device-like view --------------------------------------------------------


def test_shim_imports_the_checkout_and_declares_the_entry_points(tmp_path):
    shim = dr.make_shim(REPO, tmp_path / "shim")
    code = (
        "import importlib.metadata as md, zcbench, zcbench.harness.device_bundle as m;"
        "print(m.__file__); print(zcbench.__file__);"
        "print(sorted(e.value for e in md.entry_points(group='pytest11') if e.name == 'zcbench'));"
        "print(md.version('zcbench'))"
    )
    # -S: no site-packages, so nothing but the shim can provide zcbench (device_bundle needs only the stdlib)
    out = subprocess.run([sys.executable, "-S", "-c", code], env={**os.environ, "PYTHONPATH": str(shim)},
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    assert out[0] == str(REPO / "harness" / "device_bundle.py")  # loaded in place: pytest sees the checkout's conftests
    assert out[1] == str(shim / "zcbench" / "__init__.py")
    assert out[2] == "['zcbench.suites.plugin']"
    assert out[3] == dr._pyproject(REPO)["project"]["version"]


def test_device_like_hides_modules_in_every_process(tmp_path):
    dest = dr.write_device_like(tmp_path / "devlike", ["colorsys"])
    env = {**os.environ, "PYTHONPATH": str(dest)}
    out = subprocess.run([sys.executable, "-c", "import colorsys"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "No module named 'colorsys'" in out.stderr
    probe = "import importlib.util; print(importlib.util.find_spec('colorsys'))"  # probing code must see None
    assert subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip() == "None"
    assert subprocess.run([sys.executable, "-c", "import json"], env=env, timeout=60).returncode == 0


def test_unmet_requirements_reports_names_and_versions(tmp_path):
    info = tmp_path / "fake-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake\nVersion: 1.0\n"
                                   "Requires-Dist: surely-not-installed-zz>=1\nRequires-Dist: pip>=1\n"
                                   "Requires-Dist: pytest<1\nRequires-Dist: other-zz; python_version < '3.0'\n")
    problems = dr.unmet_requirements(tmp_path)
    assert problems[0] == "fake needs pytest<1: " + __import__("pytest").__version__ + " is installed"
    assert problems[1] == "fake needs surely-not-installed-zz>=1: not installed"
    assert len(problems) == 2


# --- the script: syntax, budgets, files that come back ---------------------------------------


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)


def test_script_budgets_fit_eight_minutes():
    text = SCRIPT.read_text()
    budgets = dr.script_budgets(text)
    assert set(budgets) == {"install", "tests", "conformance", "controls", "benchmark"}
    assert dr.budget_problem(budgets) is None
    assert sum(budgets.values()) + 15 <= 8 * 60
    assert re.search(rf"^TOTAL_S={dr.TOTAL_BUDGET_S}\b", text, re.M) and re.search(r"^RESERVE_S=15\b", text, re.M)
    for step in budgets:  # every budget is used by a step of that name
        assert f"run_step {step} \"$BUDGET_{step.upper()}\"" in text
    assert dr.budget_problem({"tests": 400, "benchmark": 100}).endswith("> 480 s")
    assert dr.budget_problem({}) == "no BUDGET_<STEP>= lines found"


def test_planned_out_files_come_back():
    assert len(dr.OUT_FILES) <= dr.MAX_OUT_FILES == 8
    for name in dr.OUT_FILES:
        assert name.count("/") <= 2 and re.fullmatch(r"[A-Za-z0-9._/-]+", name), name
    text = SCRIPT.read_text()
    for log in ("tests.txt", "conformance.txt", "controls.txt", "gpu_check.txt"):
        assert f'"$OUT_DIR/{log}"' in text
    # what comes back is committed under results/gpu/: none of it may be git-ignored (*.log is)
    ignored = subprocess.run(["git", "-C", str(REPO), "check-ignore", *(f"results/gpu/{n}" for n in dr.OUT_FILES)],
                             capture_output=True, text=True).stdout.split()
    assert ignored == []


def test_trim_out_keeps_the_planned_files(tmp_path):
    for rel in ("summary.json", "tests.txt", "conformance/matrix.json", "conformance/matrix.md", "stray/deep/x.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert dr.trim_out(tmp_path) == ["conformance/matrix.md", "stray/deep/x.txt"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "conformance/matrix.json", "summary.json", "tests.txt"]
    assert not (tmp_path / "stray").exists()


# --- the summary ---------------------------------------------------------------------------


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="reference.tests.test_gpu_logic" name="test_lease_book" time="0.01"/>
<testcase classname="reference.tests.test_gpu_logic" name="test_gpu_one_copy_per_gpu" time="0.0">
<skipped type="pytest.skip" message="no CUDA device">skip</skipped></testcase>
</testsuite></testsuites>"""


@pytest.mark.parametrize(
    ("rc", "outcomes", "dry", "note", "expected"),
    [
        (0, {"a::test_lease_book": "passed", "a::test_gpu_x": "passed"}, False, "", "passed"),
        (0, {"a::test_lease_book": "passed", "a::test_gpu_x": "skipped"}, False, "", "no-gpu-run"),
        (0, {"a::test_lease_book": "passed", "a::test_gpu_x": "skipped"}, True, "", "skipped"),
        (1, {"a::test_gpu_x": "failed"}, True, "", "failed"),
        (124, {}, False, "", "timeout"),
        (0, {"reference:gpu.outputs": "failed"}, False, "", "failed"),  # the CLI exits 0 on failed checks
        (0, {}, False, "missing", "missing"),
    ],
)
def test_step_verdict(rc, outcomes, dry, note, expected):
    found = {k: {"outcome": v, "message": ""} for k, v in outcomes.items()}
    assert dr.step_verdict("tests", rc, found, dry, note) == expected


def test_summarize_and_paste_block(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    (out / "conformance").mkdir(parents=True)
    work.mkdir()
    (work / "tests.xml").write_text(JUNIT)
    (out / "conformance" / "matrix.json").write_text(json.dumps({"implementations": {"reference": {
        "status": "ok", "results": [{"check_id": "gpu.outputs", "status": "pass", "reason": None},
                                    {"check_id": "gpu.isolation", "status": "fail", "reason": "behaved as 'raise'"},
                                    {"check_id": "gpu.owner_death", "status": "passed", "reason": None}]}}}))
    (out / "gpu_check.json").write_text(json.dumps({
        "status": "ok", "figures": {"VRAM at pool 4": "reference: allocated per actor 0/0/0/0 MiB"},
        "verdicts": {"reference.one_copy": {"ok": True, "text": "one copy"}}, "problems": {"reference.one_copy": None}}))
    steps = work / "steps.tsv"
    steps.write_text("install\t0\t9\t40\t\ntests\t0\t30\t120\t\nconformance\t0\t50\t110\t\n"
                     "controls\t0\t0\t60\tmissing\nbenchmark\t0\t80\t135\t\n")
    summary = dr.summarize(out, steps, work, dry_run=False)
    verdict = {s["name"]: s["verdict"] for s in summary["steps"]}
    assert verdict == {"install": "passed", "tests": "no-gpu-run", "conformance": "failed", "controls": "missing",
                       "benchmark": "passed"}
    assert not summary["ok"] and summary["failing"] == ["tests", "conformance"]
    assert json.loads((out / "summary.json").read_text())["failing"] == ["tests", "conformance"]
    text = dr.paste_block(summary)
    assert "VRAM at pool 4: reference: allocated per actor 0/0/0/0 MiB" in text
    assert "tests (GPU): 1 skipped: test_gpu_one_copy_per_gpu (no CUDA device)" in text
    # both vocabularies of the matrix ("pass" now, "passed" before)
    assert "conformance (GPU): 2 passed: gpu.outputs, gpu.owner_death; 1 failed: gpu.isolation (behaved as 'raise')" in text
    assert text.splitlines()[-1] == "RESULT: FAILED (tests, conformance)"
