"""The device bundle: wheels the lent GPU machine lacks, with Ray repacked to fit what a call may carry.

The lent machine has Python 3.12 with torch and many packages but no Ray and no
network; what a call carries (working tree + carried paths) is limited to 64 MiB, and
Ray's wheel alone is bigger. This module downloads the missing wheels with pip,
repacks Ray without its Java jars and the dashboard's built web client (nothing Python
imports), rewrites the wheel's RECORD, checks the total against the limit and writes a
manifest. Stdlib only, so it also runs as a plain script::

    python3 harness/device_bundle.py build                    # .bundle/cp312, for the device
    python3 harness/device_bundle.py build --python 3.11      # .bundle/cp311, for the CPU dry run
    python3 harness/device_bundle.py check .bundle/cp312      # size check only
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MiB = 2**20
#: What one device call may move: the working tree plus every carried path.
CARRY_LIMIT_BYTES = 64 * MiB
DEVICE_PYTHON = "3.12"
#: The tags the device README's recipe names (pip matches manylinux_2_N exactly).
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
#: One pinned version of each (two versions of one package stop the whole install there).
#: Ray's core needs jsonschema; the other three are jsonschema's own needs.
PINS: dict[str, str] = {
    "ray": "2.60.0",
    "jsonschema": "4.26.0",
    "jsonschema-specifications": "2025.9.1",
    "referencing": "0.37.0",
    "rpds-py": "2026.9.1",
}
#: Members of Ray's wheel that no Python import needs: Java workers' jars, the dashboard's web client.
DROP_PREFIXES = ("ray/jars/", "ray/dashboard/client/build/")
MANIFEST = "manifest.json"
#: Python packages on the lent machine (tool library's KINDS.md, read on a machine on 2026-11-17).
DEVICE_PACKAGES = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
    certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
    jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
    linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
    mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
    numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
    nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
    onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
    propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
    pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
    pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
    scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
    sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
    torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
    wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp""".split()
)


class BundleError(RuntimeError):
    """The bundle cannot be built or does not fit; the message says what and by how much."""


def normalize(name: str) -> str:
    """A distribution name in PEP 503 form (``Rpds_Py`` and ``rpds.py`` are both ``rpds-py``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_tag(version: str) -> str:
    """``"3.12"`` → ``"cp312"``: the bundle folder's name and the wheels' ABI tag."""
    major, minor = version.split(".")[:2]
    return f"cp{major}{minor}"


def dist_name(wheel: str | Path) -> str:
    """The normalized distribution name of a wheel file (``rpds_py-…whl`` → ``rpds-py``)."""
    return normalize(Path(wheel).name.split("-")[0])


# --- requirements --------------------------------------------------------------------------


def requirements(metadata: str, python_version: str, extras: Iterable[str] = ()) -> list[str]:
    """Normalized names a wheel's METADATA requires on ``python_version`` (markers evaluated, extras chosen)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement

    wanted = set(extras) | {""}
    names = []
    for line in metadata.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        env = {"python_version": python_version, "python_full_version": f"{python_version}.0"}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in wanted):
            names.append(normalize(req.name))
    return sorted(set(names))


def missing_requirements(
    metadata_by_dist: dict[str, str], present: Iterable[str], python_version: str
) -> dict[str, list[str]]:
    """For each bundled wheel, the names it requires that neither the device nor the bundle provides."""
    have = {normalize(p) for p in present} | set(metadata_by_dist)
    out = {}
    for dist, metadata in sorted(metadata_by_dist.items()):
        lacking = [r for r in requirements(metadata, python_version) if r not in have]
        if lacking:
            out[dist] = lacking
    return out


def wheel_metadata(wheel: Path) -> str:
    """The METADATA text of a wheel's own ``.dist-info`` (not of wheels vendored inside it)."""
    with zipfile.ZipFile(wheel) as zf:
        own = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        if len(own) != 1:
            raise BundleError(f"{wheel.name}: expected one top-level .dist-info/METADATA, found {own}")
        return zf.read(own[0]).decode()


# --- repacking -----------------------------------------------------------------------------


def record_hash(data: bytes) -> str:
    """A RECORD hash field: ``sha256=`` and the urlsafe base64 digest without padding."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def is_dropped(name: str) -> bool:
    """Whether a member of Ray's wheel is left out of the repack."""
    return name.startswith(DROP_PREFIXES)


@dataclass
class RepackStats:
    """What a repack kept and removed (uncompressed bytes)."""

    kept_files: int
    kept_bytes: int
    removed_files: int
    removed_bytes: int


def repack_wheel(src: Path, dest: Path, drop: Callable[[str], bool] = is_dropped, level: int = 6) -> RepackStats:
    """Copy wheel ``src`` to ``dest`` without the members ``drop`` selects, with a RECORD that lists exactly what is left.

    File modes (the executable bits of raylet and gcs_server) and timestamps are kept;
    signature files (RECORD.jws/.p7s) are dropped since they sign the old RECORD.
    """
    stats = RepackStats(0, 0, 0, 0)
    rows: list[list[str]] = []
    tmp = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zout:
        record_name = _record_name(zin)
        for info in zin.infolist():
            name = info.filename
            if name == record_name or name.startswith(record_name + "."):
                continue
            if info.is_dir():
                continue
            if drop(name):
                stats.removed_files += 1
                stats.removed_bytes += info.file_size
                continue
            data = zin.read(info)
            out = zipfile.ZipInfo(name, info.date_time)
            out.external_attr = info.external_attr
            out.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(out, data, compresslevel=level)
            rows.append([name, record_hash(data), str(len(data))])
            stats.kept_files += 1
            stats.kept_bytes += len(data)
        rows.append([record_name, "", ""])
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        out = zipfile.ZipInfo(record_name, (2020, 1, 1, 0, 0, 0))
        out.external_attr = (stat.S_IFREG | 0o644) << 16
        zout.writestr(out, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    tmp.replace(dest)
    return stats


def _record_name(zf: zipfile.ZipFile) -> str:
    records = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
    if len(records) != 1:
        raise BundleError(f"{zf.filename}: expected one top-level .dist-info/RECORD, found {records}")
    return records[0]


def verify_wheel(path: Path, forbidden: Callable[[str], bool] = is_dropped) -> list[str]:
    """Problems with a wheel: members missing from RECORD or not matching it, and members that must not be there."""
    problems = []
    with zipfile.ZipFile(path) as zf:
        record_name = _record_name(zf)
        rows = {r[0]: r for r in csv.reader(io.StringIO(zf.read(record_name).decode())) if r}
        members = [i for i in zf.infolist() if not i.is_dir()]
        for info in members:
            name = info.filename
            if forbidden(name):
                problems.append(f"{name}: should have been removed")
            if name == record_name:
                continue
            row = rows.get(name)
            if row is None:
                problems.append(f"{name}: not listed in RECORD")
                continue
            data = zf.read(info)
            if row[1] != record_hash(data) or row[2] != str(len(data)):
                problems.append(f"{name}: RECORD says {row[1]},{row[2]}, the member is {record_hash(data)},{len(data)}")
        names = {i.filename for i in members}
        problems += [f"{n}: in RECORD but not in the wheel" for n in rows if n not in names]
    return problems


# --- downloading ---------------------------------------------------------------------------


def download(pins: dict[str, str], dest: Path, python_version: str, platforms: Iterable[str] = PLATFORMS) -> list[Path]:
    """``pip download`` each pinned wheel for ``python_version`` on manylinux x86_64 into ``dest`` (cached there)."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {normalize(n): v for n, v in pins.items()}
    have = {dist_name(w): w for w in dest.glob("*.whl") if f"-{wanted.get(dist_name(w))}-" in w.name}
    todo = [f"{n}=={v}" for n, v in wanted.items() if n not in have]
    if todo:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--python-version", python_version, "--implementation", "cp", "-d", str(dest)]
        for p in platforms:
            cmd += ["--platform", p]
        result = subprocess.run(cmd + todo, capture_output=True, text=True)
        if result.returncode != 0:
            raise BundleError(f"pip download {' '.join(todo)} failed:\n{result.stderr.strip()[-2000:]}")
    found = {}
    for w in dest.glob("*.whl"):
        name = dist_name(w)
        if name in wanted and f"-{wanted[name]}-" in w.name and python_compatible(w.name, python_version):
            found[name] = w
    lacking = sorted(set(wanted) - set(found))
    if lacking:
        raise BundleError(f"pip download left no wheel for {', '.join(lacking)} in {dest}")
    return [found[n] for n in wanted]


def python_compatible(filename: str, python_version: str) -> bool:
    """Whether a wheel file name's python tags admit ``python_version`` (``py3``, ``cp312``, ``py2.py3``)."""
    tags = filename[: -len(".whl")].split("-")[-3].split(".")
    tag = python_tag(python_version)
    return any(t in ("py3", tag) for t in tags)


# --- what travels --------------------------------------------------------------------------


def tree_files(repo: Path) -> list[Path]:
    """What a device call sends of the checkout: tracked and untracked-not-ignored files (and ``shared/``)."""
    def git(*args: str) -> list[str]:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout
        return [line for line in out.split("\0") if line]

    names = set(git("ls-files", "-z")) | set(git("ls-files", "-z", "--others", "--exclude-standard"))
    files = [repo / n for n in sorted(names) if (repo / n).is_symlink() or (repo / n).is_file()]
    shared = repo / "shared"
    if shared.is_dir():
        files += [p for p in shared.rglob("*") if p.is_file() and p not in files]
    return files


def size_of(paths: Iterable[Path]) -> int:
    """Bytes of the files (a symbolic link counts as the link itself, as it travels)."""
    return sum(p.lstat().st_size for p in paths)


@dataclass
class SizeCheck:
    """The bundle and the working tree against the limit of one call."""

    bundle_bytes: int
    tree_bytes: int
    limit_bytes: int = CARRY_LIMIT_BYTES

    @property
    def total_bytes(self) -> int:
        return self.bundle_bytes + self.tree_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.limit_bytes

    def describe(self) -> str:
        """One line: each part, the total, the limit and the headroom in MiB."""
        return (
            f"bundle {self.bundle_bytes / MiB:.1f} MiB + working tree {self.tree_bytes / MiB:.1f} MiB = "
            f"{self.total_bytes / MiB:.1f} MiB of {self.limit_bytes / MiB:.0f} MiB "
            f"({'fits' if self.fits else 'OVER'}, {(self.limit_bytes - self.total_bytes) / MiB:+.1f} MiB)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_bytes": self.total_bytes, "fits": self.fits}


def size_check(bundle: Path, repo: Path, limit_bytes: int = CARRY_LIMIT_BYTES) -> SizeCheck:
    """Measure ``bundle`` (carried) and the working tree; refuses a bundle that would also travel as part of the tree."""
    tree = tree_files(repo)
    bundle = bundle.resolve()
    inside = [p for p in tree if bundle in p.resolve().parents]
    if inside:
        raise BundleError(f"{bundle} is not git-ignored: its files would travel twice ({inside[0]})")
    return SizeCheck(size_of(p for p in bundle.rglob("*") if p.is_file()), size_of(tree), limit_bytes)


# --- building ------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build(
    repo: Path, python_version: str = DEVICE_PYTHON, dest: Path | None = None, cache: Path | None = None, level: int = 6
) -> dict[str, Any]:
    """Build the bundle for ``python_version`` into ``dest`` (default ``.bundle/cpXY``); returns the manifest written there.

    ``level`` is Ray's deflate level: 6 gives 42.5 MiB in 7 s here, 1 gives 47.7 MiB in half the time.

    Raises :class:`BundleError` when a wheel cannot be fetched, the repack is invalid,
    a requirement is neither on the device nor in the bundle, or the total does not fit.
    """
    tag = python_tag(python_version)
    dest = dest or repo / ".bundle" / tag
    cache = cache or repo / ".bundle" / "cache" / tag
    wheels = download(PINS, cache, python_version)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    entries = []
    for src in wheels:
        target = dest / src.name
        entry: dict[str, Any] = {"dist": dist_name(src), "version": PINS[dist_name(src)], "file": src.name}
        if dist_name(src) == "ray":
            stats = repack_wheel(src, target, level=level)
            problems = verify_wheel(target)
            if problems:
                raise BundleError(f"repacked {src.name} is invalid: {problems[:5]}")
            entry["repacked_from"] = {"bytes": src.stat().st_size, "sha256": sha256_file(src)}
            entry["removed"] = {"prefixes": list(DROP_PREFIXES), "files": stats.removed_files, "bytes": stats.removed_bytes}
        else:
            shutil.copy2(src, target)
        entry.update(bytes=target.stat().st_size, sha256=sha256_file(target))
        entries.append(entry)
    metadata = {e["dist"]: wheel_metadata(dest / e["file"]) for e in entries}
    lacking = missing_requirements(metadata, DEVICE_PACKAGES, python_version)
    if lacking:
        raise BundleError(f"required but neither on the device nor in the bundle: {lacking}")
    check = size_check(dest, repo)
    manifest = {
        "kind": "zcbench-device-bundle",
        "python": python_version,
        "tag": tag,
        "platforms": list(PLATFORMS),
        "wheels": entries,
        "requirements_checked_against": "device package list (KINDS.md, 2026-11-17) + the bundle",
        "size": check.as_dict(),
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    check = size_check(dest, repo)  # the manifest itself travels too
    if not check.fits:
        raise BundleError(f"does not fit one device call: {check.describe()}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """CLI: ``build`` the bundle, or ``check`` an existing one against the limit."""
    parser = argparse.ArgumentParser(prog="device_bundle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download, repack, verify, size-check and write the manifest")
    b.add_argument("--python", default=DEVICE_PYTHON, help=f"target Python version (default {DEVICE_PYTHON}, the device's)")
    b.add_argument("--dest", type=Path, help="bundle folder (default .bundle/cpXY; must be git-ignored)")
    b.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    c = sub.add_parser("check", help="size check of an existing bundle folder with the working tree")
    c.add_argument("bundle", type=Path)
    c.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            manifest = build(args.repo, args.python, args.dest)
            for w in manifest["wheels"]:
                note = f" (repacked from {w['repacked_from']['bytes'] / MiB:.1f} MiB)" if "repacked_from" in w else ""
                print(f"{w['file']}: {w['bytes'] / MiB:.2f} MiB{note}")
            dest = args.dest or args.repo / ".bundle" / manifest["tag"]
            print(size_check(dest, args.repo).describe())
            carried = dest.resolve().relative_to(args.repo.resolve())
            print(f"device call: run(command=\"bash results/gpu/run_gpu_check.sh\", carry=[\"{carried}\"], timeout_s=540)")
        else:
            check = size_check(args.bundle, args.repo)
            print(check.describe())
            return 0 if check.fits else 1
    except BundleError as exc:
        print(f"device_bundle: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
