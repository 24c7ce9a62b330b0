"""One small actor per session that Ray Data's pool actors report to (load time, memory, residency).

It imports neither torch nor the suite's probes, so starting it costs a bare worker, and it
is reused by every pipeline run of the session: each run reads and clears its own records.
"""

from __future__ import annotations

from typing import Any

import ray


@ray.remote(num_cpus=0)
class Collector:
    """Records per run id, as the pool actors send them."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict[str, Any]]] = {}

    def add(self, run: str, record: dict[str, Any]) -> None:
        self.records.setdefault(run, []).append(record)

    def take(self, run: str) -> list[dict[str, Any]]:
        """The run's records, forgotten here once read."""
        return self.records.pop(run, [])


_HANDLES: dict[str, Any] = {}


def collector() -> Any:
    """The session's collector actor (started on first use, one per Ray job)."""
    job = ray.get_runtime_context().get_job_id()
    handle = _HANDLES.get(job)
    if handle is None:
        handle = _HANDLES[job] = Collector.remote()
    return handle
