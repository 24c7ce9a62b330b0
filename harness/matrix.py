"""The benchmark matrix: settings, validation of each axis, and the list of cells.

A cell is one (implementation, model, device, pool size, batch size); every axis value
is checked before anything starts, so a typo fails at once with a clear message.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from zcbench.suites.cases import MIXED, ModelCase, blob_case

VALID_POOLS = (1, 2, 4, 8, 16)
VALID_BATCHES = (1, 8, 32, 128)
VALID_DEVICES = ("cpu", "cuda")
#: Simulated nodes share one host: each costs a raylet, a store and its workers.
MAX_NODES = 8
MAX_BLOB_MIB = 1024
_BLOB = re.compile(r"^mlp-(\d+)mib$")
MAX_TENSORS = 20000
TENSOR_WIDTH = 1024  # float32 elements per tensor: 4 KiB each
_TENSORS = re.compile(r"^tensors-(\d+)$")


class MatrixError(ValueError):
    """An axis value of the matrix is unknown or out of range."""


@dataclass
class Settings:
    """Everything that defines a run; stored verbatim in the results file."""

    impls: list[str]
    models: list[str]
    pools: list[int]
    batches: list[int]
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    rounds: int = 3
    warmup: int = 1
    rows: int = 1024
    seed: int = 0
    cell_timeout_s: float = 300.0
    ray_address: str | None = None
    quick: bool = False
    nodes: int = 1  # simulated nodes of the private cluster (each with its own object store)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Settings":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def quick_settings(installed: list[str]) -> Settings:
    """A small matrix for 2 idle cores: the ``installed`` implementations (reference and naive first),
    one 64 MiB model, pools 4,1 (largest first: an interrupted run still has the main comparison),
    batches 8,32, two rounds."""
    impls = [n for n in ("reference", "naive") if n in installed] + [
        n for n in installed if n not in ("reference", "naive")
    ]
    return Settings(impls=impls, models=["mlp-64mib"], pools=[4, 1], batches=[8, 32], rounds=2, warmup=0, rows=256,
                    cell_timeout_s=600.0, quick=True)


class ManyTensors(nn.Module):
    """``n`` small parameters (4 KiB each): load cost per tensor, not per byte, dominates.

    Output column ``i`` is the input's dot product with tensor ``i``, so every tensor shapes the output.
    """

    def __init__(self, n: int, width: int = TENSOR_WIDTH):
        super().__init__()
        self.tensors = nn.ParameterList(nn.Parameter(torch.randn(width)) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x @ t for t in self.tensors], dim=1)


def build_many_tensors(n: int) -> nn.Module:
    torch.manual_seed(0)
    return ManyTensors(n).eval()


def _many_tensors_inputs() -> tuple:
    return (torch.randn(8, TENSOR_WIDTH, generator=torch.Generator().manual_seed(2)),)


def tensors_case(n: int) -> ModelCase:
    """``tensors-<n>``: n parameters of 1024 float32, inputs of width 1024 like the blob MLPs."""
    from functools import partial

    return ModelCase(f"tensors-{n}", partial(build_many_tensors, n), _many_tensors_inputs)


def resolve_model(name: str) -> ModelCase:
    """``mlp-<N>mib`` (a blob MLP, N ≤ 1024), ``tensors-<N>`` (N 4-KiB tensors, N ≤ 20000), ``mixed``,
    or a real architecture from zcbench.suites.models."""
    m = _TENSORS.match(name)
    if m:
        n = int(m.group(1))
        if not 1 <= n <= MAX_TENSORS:
            raise MatrixError(f"model {name!r}: tensor count must be 1..{MAX_TENSORS}")
        return tensors_case(n)
    m = _BLOB.match(name)
    if m:
        mib = int(m.group(1))
        if not 1 <= mib <= MAX_BLOB_MIB:
            raise MatrixError(f"model {name!r}: blob size must be 1..{MAX_BLOB_MIB} MiB")
        return blob_case(mib)
    if name == MIXED.name:
        return MIXED
    try:
        from zcbench.suites import models  # written separately; optional
    except ImportError:
        models = None
    if models is not None:
        get_case = getattr(models, "get_case", None)
        real = getattr(models, "REAL_CASES", {})
        try:
            if get_case is not None:
                return get_case(name)
            if name in real:
                return real[name]
        except (KeyError, ValueError, LookupError):
            pass
    raise MatrixError(f"unknown model {name!r}: use mlp-<N>mib (N in 1..{MAX_BLOB_MIB}), tensors-<N> (N in 1..{MAX_TENSORS}), {MIXED.name!r}, or one of {real_model_names()}")


def real_model_names() -> list[str]:
    """Names of real architectures, empty when zcbench.suites.models is not there."""
    try:
        from zcbench.suites import models
    except ImportError:
        return []
    real = getattr(models, "REAL_CASES", {})
    return sorted(real.keys() if isinstance(real, dict) else (getattr(c, "name", str(c)) for c in real))


def validate(settings: Settings, cuda_available: bool | None = None) -> None:
    """Raise MatrixError for any unknown or out-of-range axis value (implementations are checked by the caller)."""
    if not settings.impls:
        raise MatrixError("no implementation chosen")
    for axis, values, allowed in (("pool", settings.pools, VALID_POOLS), ("batch", settings.batches, VALID_BATCHES)):
        if not values:
            raise MatrixError(f"no {axis} size chosen")
        bad = [v for v in values if v not in allowed]
        if bad:
            raise MatrixError(f"{axis} size(s) {bad} not in {list(allowed)}")
    for d in settings.devices:
        if d not in VALID_DEVICES:
            raise MatrixError(f"device {d!r} not in {list(VALID_DEVICES)}")
    if "cuda" in settings.devices:
        if cuda_available is None:
            import torch

            cuda_available = torch.cuda.is_available()
        if not cuda_available:
            raise MatrixError("device 'cuda' chosen but torch sees no CUDA device on this machine")
    if not settings.models:
        raise MatrixError("no model chosen")
    for m in settings.models:
        resolve_model(m)
    if settings.rounds < 1:
        raise MatrixError("--rounds must be at least 1")
    if settings.warmup < 0:
        raise MatrixError("--warmup must be 0 or more")
    if settings.rows < 1:
        raise MatrixError("--rows must be at least 1")
    if not 1 <= settings.nodes <= MAX_NODES:
        raise MatrixError(f"--nodes must be between 1 and {MAX_NODES} (simulated nodes on this host), not {settings.nodes}")
    if settings.nodes > 1 and settings.ray_address:
        raise MatrixError("--nodes simulates nodes in a private cluster; with --ray-address the cluster's own nodes are used")


def cell_id(params: dict[str, Any]) -> str:
    """A stable key of a cell, e.g. ``reference|mlp-64mib|cpu|pool4|batch32``."""
    return f"{params['impl']}|{params['model']}|{params['device']}|pool{params['pool']}|batch{params['batch']}"


def cell_keys(settings: Settings) -> list[dict[str, Any]]:
    """Cells without the implementation, in run order; each key's implementations are interleaved."""
    return [
        {"model": m, "device": d, "pool": p, "batch": b}
        for m in settings.models
        for d in settings.devices
        for p in settings.pools
        for b in settings.batches
    ]
