"""The benchmark matrix: settings, validation of each axis and its range limits, the cells, the input size.

A cell is one (implementation, model, device, pool size, batch size). Model names come
from the one registry, :mod:`zcbench.suites.models`; this module only checks the ranges a shared 2-core machine can
run and expands model sets (``scale``). Every axis value is checked before anything
starts, so a typo fails at once with a clear message.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from zcbench.suites import models


VALID_POOLS = (1, 2, 4, 8, 16)
VALID_BATCHES = (1, 8, 32, 128)
VALID_DEVICES = ("cpu", "cuda")
#: Simulated nodes share one host: each costs a raylet, a store and its workers.
MAX_NODES = 8
MAX_BLOB_MIB = 1024
MAX_TENSORS = 20000
_BLOB = re.compile(r"^mlp-(\d+)mib$")
_TENSORS = re.compile(r"^tensors-(\d+)$")
#: The quick profile's model: big enough that one copy per actor is plain next to an empty actor (~230 MiB USS).
QUICK_MODEL = "mlp-256mib"


class MatrixError(ValueError):
    """An axis value of the matrix is unknown or out of range."""


@dataclass
class Settings:
    """Everything that defines a run; stored verbatim in the results file.

    Each round of a cell is one Ray Data job whose every pool actor runs ``warmup_calls``
    batches (the first and second forward) and then at least ``steady_batches`` more
    (the steady state); ``rows`` is derived from that unless set. Cells of pools outside
    ``steady_pools`` run one batch per actor past the warm-up (load and memory only, no
    throughput). ``audit_batches`` batches of each round are re-run in the driver and
    compared bit for bit.
    """

    impls: list[str]
    models: list[str]
    pools: list[int]
    batches: list[int]
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    rounds: int = 3
    warmup: int = 0  # unrecorded rounds per cell before the measured ones
    rows: int | None = None  # None: enough for steady_batches per actor (see rows_for)
    steady_batches: int = 20
    steady_pools: list[int] | None = None  # pools whose cells measure the steady state (None: all)
    warmup_calls: int = 2
    audit_batches: int = 8
    seed: int = 0
    cell_timeout_s: float = 600.0
    ray_address: str | None = None
    quick: bool = False
    full: bool = False
    nodes: int = 1  # simulated nodes of the private cluster (each with its own object store)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Settings:
        """Settings from a results file (keys this version does not know are ignored)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def default_settings() -> Settings:
    """``zcbench run`` without --quick: reference vs naive over the whole pool and batch range."""
    return Settings(impls=["reference", "naive"], models=["mlp-64mib"], pools=[1, 2, 4, 8], batches=[1, 8, 32, 128])


def quick_settings(installed: list[str]) -> Settings:
    """The headline on 2 idle cores: every installed implementation (reference and naive first), one
    256 MiB model, pools 2 and 1 (largest first: an interrupted run still has the main comparison;
    two, not four, because each fresh pool actor costs 3-5 CPU-seconds), one batch size, one round."""
    impls = ordered_impls(installed)
    return Settings(impls=impls, models=[QUICK_MODEL], pools=[2, 1], batches=[8], rounds=1, steady_pools=[2],
                    audit_batches=4, quick=True)  # fmt: skip


def full_settings(installed: list[str]) -> Settings:
    """The committed CPU baseline's matrix: every installed implementation, 256 MiB, pools 1-8, batches 1-128, 3 rounds."""
    return Settings(impls=ordered_impls(installed), models=[QUICK_MODEL], pools=[1, 2, 4, 8], batches=[1, 8, 32, 128],
                    rounds=3, full=True)  # fmt: skip


def ordered_impls(installed: list[str]) -> list[str]:
    """Reference and naive first (the comparison that matters), then the others in registry order."""
    return [n for n in ("reference", "naive") if n in installed] + [n for n in installed if n not in ("reference", "naive")]


def expand_models(names: list[str]) -> list[str]:
    """Model names with every model set (``scale``) replaced by its members, duplicates dropped."""
    out: list[str] = []
    for n in names:
        out += models.MODEL_SETS.get(n, (n,))
    return list(dict.fromkeys(out))


def resolve_model(name: str) -> models.ModelCase:
    """The case called ``name`` after the range check: ``mlp-<N>mib`` (N ≤ 1024), ``tensors-<N>`` (N ≤ 20000),
    or any other name of zcbench.suites.models."""
    if m := _TENSORS.match(name):
        if not 1 <= int(m.group(1)) <= MAX_TENSORS:
            raise MatrixError(f"model {name!r}: tensor count must be 1..{MAX_TENSORS}")
    elif m := _BLOB.match(name):
        if not 1 <= int(m.group(1)) <= MAX_BLOB_MIB:
            raise MatrixError(f"model {name!r}: blob size must be 1..{MAX_BLOB_MIB} MiB")
    try:
        return models.get(name)
    except models.UnknownModelError as exc:
        raise MatrixError(f"{exc}, or a set: {', '.join(models.MODEL_SETS)}") from None


def missing_requirements(name: str) -> list[str]:
    """Modules model ``name`` needs that cannot be imported here."""
    import importlib.util

    needs = models.REQUIREMENTS.get(name, ())
    return [mod for mod in needs if importlib.util.find_spec(mod) is None]


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
        missing = missing_requirements(m)
        if missing:
            raise MatrixError(f"model {m!r} needs {', '.join(missing)} (pip install 'zcbench[compare]')")
    for name, value, low in (("--rounds", settings.rounds, 1), ("--warmup", settings.warmup, 0),
                             ("--steady-batches", settings.steady_batches, 1), ("--audit-batches", settings.audit_batches, 1)):  # fmt: skip
        if value < low:
            raise MatrixError(f"{name} must be at least {low}")
    if settings.rows is not None and settings.rows < 1:
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


#: Rows margin over the bare need: Ray Data hands blocks to whichever actor is free and starts the
#: actors on batches seconds apart, so the last to start runs fewer batches than its share.
ROWS_SLACK = 2.0
#: Smallest input block, and blocks per actor: small blocks balance the pool, tiny ones cost task overhead.
MIN_BLOCK_ROWS = 64
BLOCKS_PER_ACTOR = 4


@dataclass(frozen=True)
class InputPlan:
    """How many rows one round pushes through the pipeline and in how many files (one block each)."""

    rows: int
    files: int


def is_steady(settings: Settings, pool: int) -> bool:
    """Whether cells of this pool size measure the steady state."""
    return settings.steady_pools is None or pool in settings.steady_pools


def rows_for(settings: Settings, pool: int, batch: int) -> InputPlan:
    """Rows enough for every actor to run the warm-up calls and ``steady_batches`` full batches after them.

    Each file (one read block) holds a whole number of batches, so no batch is cut short
    at a block boundary and every steady batch has the same shape. An explicit
    ``settings.rows`` (for models whose batches are expensive) is rounded up to blocks of
    two batches.
    """
    if settings.rows is not None:
        files = max(1, math.ceil(settings.rows / (2 * batch)))
        return InputPlan(files * 2 * batch, files)
    if not is_steady(settings, pool):  # load and memory only: each actor runs its warm-up calls and one more
        files = pool * math.ceil((settings.warmup_calls + 1) / 2)
        return InputPlan(files * 2 * batch, files)
    per_block = max(2, math.ceil(MIN_BLOCK_ROWS / batch)) * batch
    need = pool * (settings.warmup_calls + settings.steady_batches) * batch * ROWS_SLACK
    files = max(math.ceil(need / per_block), pool * BLOCKS_PER_ACTOR)
    return InputPlan(files * per_block, files)
