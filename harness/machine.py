"""What ran the benchmark: machine, library versions and git commit."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpus() -> list[str]:
    """CUDA device names, empty when torch sees none."""
    try:
        import torch

        if torch.cuda.is_available():
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, GPUs, host and platform."""
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "ram_bytes": int(psutil.virtual_memory().total),
        "gpus": gpus(),
        "platform": platform.platform(),
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Python and key library versions (plus ``extra``, e.g. each implementation's version)."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "ray", "numpy", "pyarrow", "zcbench", "ray-zerocopy", "transformers"):
        v = _dist_version(dist)
        if v is not None:
            out[dist] = v
    out.setdefault("torch", "absent")
    out.setdefault("ray", "absent")
    out.update(extra or {})
    return out


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """HEAD's sha and whether the code has uncommitted changes (read-only git calls).

    ``results/`` is left out: a run that writes its results there must not call its own tree dirty.
    """
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results")
    return {"sha": sha, "dirty": None if status is None else bool(status)}
