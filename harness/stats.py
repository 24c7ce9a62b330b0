"""Summary statistics of repeated measurements: median and spread (IQR, min/max)."""

from __future__ import annotations

import statistics
from typing import Any


def summarize(values: list[float]) -> dict[str, Any]:
    """Median, quartiles (inclusive method), IQR, min, max and count of ``values``."""
    vals = sorted(float(v) for v in values)
    if not vals:
        raise ValueError("no values to summarize")
    if len(vals) == 1:
        q1 = q3 = vals[0]
    else:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def percentile(values: list[float], pct: float) -> float:
    """The ``pct``-th percentile (linear interpolation between closest ranks)."""
    vals = sorted(values)
    if not vals:
        raise ValueError("no values")
    k = (len(vals) - 1) * pct / 100
    lo = int(k)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


def turn_order(items: list[Any], turn: int) -> list[Any]:
    """The order of ``items`` in turn ``turn`` (0-based): as given in even turns, reversed in odd ones.

    Used wherever implementations or copies take turns (benchmark rounds, interleaved forward
    passes). With a fixed A B order, three rounds of ``steady-ratio`` (reference first, naive
    second) put the reference's median steady latency 2.6-7.8 % behind naive's at every point,
    while the two models' forward passes timed alternately inside one actor differed by nothing
    systematic: the cost was the position (most likely the clean-up of the job just before), not
    the memory. Reversing the order every turn cancels any effect of position over each even
    number of turns.
    """
    return list(items) if turn % 2 == 0 else list(items)[::-1]
