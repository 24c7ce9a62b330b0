"""Per-batch timings of one pipeline run: first and second forward, the steady state, throughput.

Every output row of :func:`zcbench.suites.pipeline.run` carries its batch's ``pid``, ``call``
(0 = the actor's first batch), ``t0`` (wall clock at the call's start) and ``latency_s`` (timed
inside ``__call__``). Steady state means
each actor's calls from ``warmup_calls`` on, full batches only (a batch cut short at the end
of the input has another shape and would flatter the latency). Ray Data starts the pool's
actors on batches seconds apart (blocks arrive as its read tasks' worker processes come
up), so the pool throughput is taken over the window in which all of them were busy, and
its length is reported beside it; the per-batch latency does not depend on that window.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from .stats import percentile


@dataclass(frozen=True)
class Call:
    """One ``__call__`` of one pool actor."""

    pid: int
    call: int
    t0: float
    latency_s: float
    rows: int

    @property
    def t1(self) -> float:
        return self.t0 + self.latency_s


def calls_of(table: Any) -> list[Call]:
    """One :class:`Call` per (pid, call) of an output table, in (pid, call) order."""
    cols = table.select(["pid", "call", "t0", "latency_s"]).to_pydict()
    acc: dict[tuple[int, int], list] = {}
    for pid, call, t0, lat in zip(cols["pid"], cols["call"], cols["t0"], cols["latency_s"]):
        rec = acc.setdefault((pid, call), [t0, lat, 0])
        rec[2] += 1
    return [Call(pid, call, t0, lat, n) for (pid, call), (t0, lat, n) in sorted(acc.items())]


def by_pid(calls: list[Call]) -> dict[int, list[Call]]:
    """Calls grouped per actor, in call order."""
    out: dict[int, list[Call]] = defaultdict(list)
    for c in calls:
        out[c.pid].append(c)
    return dict(out)


def window_throughput(steady: dict[int, list[Call]]) -> tuple[float, float]:
    """Rows/s of the pool over the window in which every actor was in steady state, and the window's length.

    The window runs from the latest first-steady-call start to the earliest last-call end,
    so every actor was warmed up and still working throughout; calls crossing an edge
    count by the fraction inside. Gaps between an actor's calls (Ray Data handing it the
    next block) are part of the window, as a user's job would feel them.
    """
    lo = max(cs[0].t0 for cs in steady.values())
    hi = min(cs[-1].t1 for cs in steady.values())
    if hi <= lo:
        return float("nan"), 0.0
    rows = 0.0
    for cs in steady.values():
        for c in cs:
            inside = min(c.t1, hi) - max(c.t0, lo)
            if inside > 0 and c.latency_s > 0:
                rows += c.rows * inside / c.latency_s
    return rows / (hi - lo), hi - lo


#: What a cell without a steady state keeps of :func:`summarize_calls`.
NOT_STEADY = frozenset({"pipeline_actors", "first_forward_s", "second_forward_s", "first_vs_second"})


def summarize_calls(calls: list[Call], batch: int, warmup_calls: int) -> dict[str, float]:
    """First/second forward, steady latency (p50, IQR, p99), steady throughput and the fewest steady batches per actor."""
    per = by_pid(calls)
    m: dict[str, float] = {"pipeline_actors": len(per)}
    first = [cs[0].latency_s for cs in per.values() if cs[0].call == 0]
    second = [cs[1].latency_s for cs in per.values() if len(cs) > 1 and cs[1].call == 1]
    if first:
        m["first_forward_s"] = statistics.median(first)
    if second:
        m["second_forward_s"] = statistics.median(second)
        m["first_vs_second"] = m["first_forward_s"] / m["second_forward_s"] if m["second_forward_s"] > 0 else float("nan")
    steady = {pid: [c for c in cs if c.call >= warmup_calls and c.rows == batch] for pid, cs in per.items()}
    m["steady_batches_min"] = min((len(cs) for cs in steady.values()), default=0)
    steady = {pid: cs for pid, cs in steady.items() if cs}
    lat = sorted(c.latency_s for cs in steady.values() for c in cs)
    if lat:
        m["latency_p50_s"] = percentile(lat, 50)
        m["latency_iqr_s"] = percentile(lat, 75) - percentile(lat, 25)
        m["latency_p99_s"] = percentile(lat, 99)
        rate, span = window_throughput(steady)
        if span > 0:
            m["throughput_rows_s"] = rate
            m["throughput_window_s"] = span
    return m
