"""Load-time micro-benchmarks of any implementation, as a pytest-benchmark suite.

    pytest --pyargs zcbench.harness.bench_load --zc-impl reference --benchmark-json out.json
    pytest-benchmark compare out-a.json out-b.json --group-by=group

Per model shape (the ``scale`` set: 12 tensors of a 384 MiB model, ``tensors-500``, 2,000
Linear layers = 4,000 tensors, ``tensors-5000``, ``tensors-20000``), each round loads the
wrapped model in a fresh Ray actor (a process that never loaded anything,
:func:`zcbench.suites.hosts.load` with ``fresh=True``), then runs the first and the second
forward pass there, then steady forward passes of the loaded model taking turns with a
private copy of it in the same actor (:func:`zcbench.harness.inactor.steady_vs_private`):
what serving from shared weights costs once running, with nothing else different.
``--zc-impl`` (the suite's pytest plugin) names the implementation.

What pytest-benchmark records is **the time measured inside the actor**, not the driver's
round trip: the benchmarks run in pedantic mode with a clock (:class:`ActorClock`) that
advances by exactly the seconds the actor measured, so the statistics, ``--benchmark-json``
and ``pytest-benchmark compare`` all see the in-actor times. The driver's round trips are
kept in ``extra_info["driver_s"]``. The load rounds are measured live in ``test_load``;
the forward benchmarks report the same actors' forward passes (measured right after
each load, in the same process), so one fresh process per round serves all four. The
metadata floor (building the shape's tensors as views plus Parameters, no bytes moved) is
timed live in the driver with pytest-benchmark's own timer. ``test_first_use`` times, in a
fresh actor of its own, what every load pays once per process whatever the implementation
and the shape (the first object-store ``get`` and the first tensor): at a few tensors a
fresh actor's load cannot be faster.

``ZCBENCH_BENCH_ROUNDS`` sets the rounds (fresh actors) per shape, 5 by default; ``-k`` selects shapes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

# Absolute imports only: pytest may import this file under another name (``harness.bench_load``), and
# whatever Ray pickles by reference must resolve in the workers.
from zcbench.harness.floor import build_views, tensor_specs
from zcbench.harness.inactor import first_use_s, steady_vs_private, timed_forward
from zcbench.harness.matrix import resolve_model
from zcbench.suites import models, probes

MiB = 2**20
ROUNDS = int(os.environ.get("ZCBENCH_BENCH_ROUNDS") or 5)
#: The driver's node for these benchmarks: room for the largest shape twice (a copy being freed, the next).
LAYOUT_CPUS, LAYOUT_STORE = 4, 1024 * MiB


class ActorClock:
    """A timer for pytest-benchmark that moves only when told: by a duration measured inside the actor."""

    __name__ = "ActorClock (seconds measured inside the Ray actor)"

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def use_clock(benchmark: Any) -> ActorClock:
    """Make ``benchmark`` time with a fresh :class:`ActorClock` (pytest-benchmark keeps its timer in ``_timer``)."""
    if not hasattr(benchmark, "_timer"):
        raise RuntimeError("this pytest-benchmark version has no BenchmarkFixture._timer; the in-actor clock cannot be set")
    clock = ActorClock()
    benchmark._timer = clock
    return clock


@dataclass
class Shape:
    """One model shape wrapped once; its rounds (one fresh actor each) are measured on demand."""

    impl: Any
    name: str
    case: models.ModelCase = field(init=False)
    wrapped: Any = None
    model_bytes: int = 0
    num_tensors: int = 0
    rounds: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.case = resolve_model(self.name)

    def _wrap(self) -> None:
        original = models.build(self.case)
        self.model_bytes = probes.model_bytes(original)
        self.num_tensors = sum(1 for _ in probes.named_tensors(original))
        self.wrapped = self.impl.wrap(original, "actor")

    def measure(self) -> dict[str, float]:
        """One more round: load in a fresh actor, its first and second forward pass, then steady ones vs a private copy."""
        import ray
        from zcbench.suites import hosts

        if self.wrapped is None:
            self._wrap()
        start = time.perf_counter()
        [loaded] = hosts.load(self.impl, self.wrapped, 1, fresh=True)
        driver_s = time.perf_counter() - start
        try:
            inputs = self.case.inputs()
            first = ray.get(loaded.apply(timed_forward, self.case.method, inputs))
            second = ray.get(loaded.apply(timed_forward, self.case.method, inputs))
            steady = ray.get(loaded.apply(steady_vs_private, self.case.method, inputs))
        finally:
            hosts.release([loaded])
        self.rounds.append({"load_s": loaded.report["load_s"], "first_s": first, "second_s": second, "driver_s": driver_s,
                            "steady_s": steady["shared_s"], "private_s": steady["private_s"]})  # fmt: skip
        return self.rounds[-1]

    def round(self, i: int) -> dict[str, float]:
        """Round ``i`` (measured now if it was not yet)."""
        while len(self.rounds) <= i:
            self.measure()
        return self.rounds[i]

    def close(self) -> None:
        if self.wrapped is not None:
            from zcbench.suites.contract import release

            release(self.impl, self.wrapped)
            self.wrapped = None


@pytest.fixture(scope="module")
def cluster(pytestconfig: pytest.Config) -> Any:
    """The process's Ray session: the one already running, else a private one-node cluster."""
    from zcbench.suites import session

    current = session.current()
    if not current.nodes:
        address = pytestconfig.getoption("--zc-ray-address", default=None)
        current = session.install(session.Session(address, layout={session.HEAD: session.NodeSpec(LAYOUT_CPUS, LAYOUT_STORE)}))
    current.start()
    return current


@pytest.fixture(scope="module")
def shape_runs(zc_impl: Any, cluster: Any) -> Any:
    """Shape name -> :class:`Shape`, shared by the module's benchmarks; wrapped objects released at the end."""
    made: dict[str, Shape] = {}

    def get(name: str) -> Shape:
        if name not in made:
            made[name] = Shape(zc_impl, name)
        return made[name]

    yield get
    for s in made.values():
        s.close()


def _describe(benchmark: Any, impl: Any, s: Shape, what: str) -> None:
    benchmark.extra_info.update({
        "implementation": impl.name, "version": str(impl.version), "shape": s.name, "measure": what,
        "num_tensors": s.num_tensors, "model_bytes": s.model_bytes,
        "timing": "seconds measured inside a fresh Ray actor (zcbench.harness.bench_load.ActorClock)",
        "driver_s": [r["driver_s"] for r in s.rounds],
    })  # fmt: skip


SHAPES = pytest.mark.parametrize("shape", models.MODEL_SETS['scale'])


@SHAPES
def test_load(benchmark: Any, shape_runs: Any, zc_impl: Any, shape: str) -> None:
    """``load`` in a fresh actor (the implementation's own call, timed in the actor)."""
    s = shape_runs(shape)
    clock = use_clock(benchmark)
    benchmark.group = shape  # read when the statistics are made: before pedantic
    benchmark.pedantic(lambda: clock.advance(s.measure()["load_s"]), rounds=ROUNDS, iterations=1)
    _describe(benchmark, zc_impl, s, "load")


@SHAPES
def test_first_forward(benchmark: Any, shape_runs: Any, zc_impl: Any, shape: str) -> None:
    """The first forward pass after a fresh load (pages touched for the first time)."""
    s = shape_runs(shape)
    clock, rounds = use_clock(benchmark), iter(range(ROUNDS))
    benchmark.group = shape
    benchmark.pedantic(lambda: clock.advance(s.round(next(rounds))["first_s"]), rounds=ROUNDS, iterations=1)
    _describe(benchmark, zc_impl, s, "first forward")


@SHAPES
def test_second_forward(benchmark: Any, shape_runs: Any, zc_impl: Any, shape: str) -> None:
    """The second forward pass of the same actor."""
    s = shape_runs(shape)
    clock, rounds = use_clock(benchmark), iter(range(ROUNDS))
    benchmark.group = shape
    benchmark.pedantic(lambda: clock.advance(s.round(next(rounds))["second_s"]), rounds=ROUNDS, iterations=1)
    _describe(benchmark, zc_impl, s, "second forward")


@SHAPES
def test_steady_forward(benchmark: Any, shape_runs: Any, zc_impl: Any, shape: str) -> None:
    """Steady forward passes of the loaded model (median per actor), timed in turns with a private copy of it.

    ``extra_info``: the private copy's medians and ``speed_vs_private`` (private over loaded, per
    round; 1.0 means serving from the shared weights costs nothing once running).
    """
    s = shape_runs(shape)
    clock, rounds = use_clock(benchmark), iter(range(ROUNDS))
    benchmark.group = shape
    benchmark.pedantic(lambda: clock.advance(s.round(next(rounds))["steady_s"]), rounds=ROUNDS, iterations=1)
    _describe(benchmark, zc_impl, s, "steady forward (median per actor), in turns with a private copy")
    benchmark.extra_info["private_s"] = [r["private_s"] for r in s.rounds]
    benchmark.extra_info["speed_vs_private"] = [r["private_s"] / r["steady_s"] for r in s.rounds]


@SHAPES
def test_metadata_floor(benchmark: Any, shape: str) -> None:
    """Building the shape's tensors as views of their storages plus Parameters: the floor under any load (driver)."""
    original = models.build(resolve_model(shape))
    specs = tensor_specs(original)
    benchmark.group = shape
    benchmark.extra_info.update({"measure": "metadata floor", "shape": shape, "num_tensors": len(specs),
                                 "timing": "pytest-benchmark's timer, in the driver"})  # fmt: skip
    benchmark.pedantic(build_views, args=(specs,), rounds=ROUNDS * 4, iterations=1)


def test_first_use(benchmark: Any, cluster: Any) -> None:
    """What a fresh process pays once, before any model: the first store ``get`` and the first tensor (in-actor time).

    ``extra_info``: the two parts per round. The stored object is 1 MiB (never inlined by Ray).
    """
    import numpy as np
    import ray

    stored = ray.put(np.zeros(MiB, np.uint8))
    parts: list[dict[str, float]] = []

    def one_round() -> None:
        parts.append(first_use_s(stored))
        clock.advance(sum(parts[-1].values()))

    clock = use_clock(benchmark)
    benchmark.group = "first use"
    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update({
        "measure": "first store get + first tensor in a fresh process", "store_get_s": [p["store_get_s"] for p in parts],
        "tensor_s": [p["tensor_s"] for p in parts], "timing": "seconds measured inside a fresh Ray actor",
    })  # fmt: skip
