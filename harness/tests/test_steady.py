"""Per-batch timings of a pipeline run, from a fabricated output table: warm-up, steady state, window throughput."""

from __future__ import annotations

import pyarrow as pa
import pytest
from zcbench.harness import steady


def table(actors: dict[int, list[tuple[float, float, int]]]) -> pa.Table:
    """Output rows as the pipeline writes them: per actor a list of (t0, latency, rows) calls."""
    cols: dict[str, list] = {"pid": [], "call": [], "t0": [], "latency_s": []}
    for pid, calls in actors.items():
        for i, (t0, lat, rows) in enumerate(calls):
            for _ in range(rows):
                cols["pid"].append(pid)
                cols["call"].append(i)
                cols["t0"].append(t0)
                cols["latency_s"].append(lat)
    return pa.table(cols)


def back_to_back(start: float, first: float, rest: float, n: int, rows: int = 8, last_rows: int | None = None):
    calls, t = [], start
    for i in range(n):
        lat = first if i == 0 else rest
        calls.append((t, lat, rows if (i < n - 1 or last_rows is None) else last_rows))
        t += lat
    return calls


def test_first_second_and_steady_latency_leave_out_warm_up_and_short_batches():
    t = table({1: back_to_back(0.0, 0.5, 0.1, 24, last_rows=3), 2: back_to_back(0.0, 0.3, 0.1, 23)})
    m = steady.summarize_calls(steady.calls_of(t), batch=8, warmup_calls=2)
    assert m["first_forward_s"] == pytest.approx(0.4) and m["second_forward_s"] == pytest.approx(0.1)
    assert m["first_vs_second"] == pytest.approx(4.0)
    assert m["latency_p50_s"] == pytest.approx(0.1) and m["latency_iqr_s"] == pytest.approx(0.0)
    assert m["steady_batches_min"] == 21  # actor 1: 24 calls - 2 warm-up - 1 short last batch
    assert m["pipeline_actors"] == 2
    # two actors, each 8 rows per 0.1 s while both are busy
    assert m["throughput_rows_s"] == pytest.approx(160.0, rel=1e-6)


def test_window_is_where_every_actor_is_warm_and_still_busy():
    # actor 2 starts late and ends early: only the overlap counts, with edge calls by fraction
    t = table({1: back_to_back(0.0, 0.1, 0.1, 40), 2: back_to_back(1.0, 0.1, 0.2, 10)})
    calls = steady.by_pid([c for c in steady.calls_of(t) if c.call >= 2])
    rate, span = steady.window_throughput(calls)
    lo, hi = 1.0 + 0.1 + 0.2, 1.0 + 0.1 + 9 * 0.2  # actor 2's first steady call start, its last call end
    assert span == pytest.approx(hi - lo)
    assert rate == pytest.approx(8 / 0.1 + 8 / 0.2, rel=1e-6)
