"""Physical evidence, read independently of what an implementation says about itself.

Where each tensor's bytes lie (inside the object store mapping or not, from
``/proc/self/maps``), how much private and proportional memory a process holds
(psutil USS/PSS and ``/proc/PID/smaps``), and how many bytes each node's object store
holds (the raylet's own stats). Never sums of RSS: RSS counts a shared page once in
every process that touches it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

MiB = 2**20


def plasma_ranges(pid: int | str = "self") -> list[tuple[int, int]]:
    """Address ranges of the object store mappings (lines of maps containing 'plasma')."""
    ranges = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            if "plasma" in line:
                lo, hi = line.split(maxsplit=1)[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def modules_of(obj: Any, _seen: set[int] | None = None) -> Iterator[tuple[str, torch.nn.Module]]:
    """Every ``nn.Module`` reachable from a model or pipeline, with an attribute path, once each."""
    seen = set() if _seen is None else _seen
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        path, value = stack.pop()
        if id(value) in seen or isinstance(value, (str, bytes, int, float, bool, type(None), torch.Tensor)):
            continue
        seen.add(id(value))
        if isinstance(value, torch.nn.Module):
            yield path, value
            continue  # its submodules are reported by named_parameters/named_buffers
        if isinstance(value, dict):
            stack.extend((f"{path}[{k!r}]", v) for k, v in value.items())
        elif isinstance(value, (list, tuple, set)):
            stack.extend((f"{path}[{i}]", v) for i, v in enumerate(value))
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            stack.extend((f"{path}.{k}".lstrip("."), v) for k, v in vars(value).items())


def named_tensors(obj: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and buffers of every module in ``obj`` (tied ones reported under each name)."""
    for prefix, module in modules_of(obj):
        dot = f"{prefix}." if prefix else ""
        for name, t in module.named_parameters(remove_duplicate=False):
            yield dot + name, t
        for name, t in module.named_buffers(remove_duplicate=False):
            yield dot + name, t


@dataclass
class Residency:
    """Where the bytes of a loaded model's tensors are, per unique storage."""

    tensors: int
    storages: int
    bytes_total: int
    bytes_in_store: int
    outside: list[str]  # names of tensors whose bytes lie outside the store mapping

    @property
    def fraction_in_store(self) -> float:
        return self.bytes_in_store / self.bytes_total if self.bytes_total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "fraction_in_store": self.fraction_in_store}


def residency(obj: Any, min_bytes: int = 0) -> Residency:
    """Check, for each CPU tensor of ``obj``, whether its storage lies inside an object store mapping.

    Storages smaller than ``min_bytes`` are ignored (Ray inlines small objects).
    """
    ranges = plasma_ranges()
    seen: dict[int, bool] = {}
    total = inside = count = 0
    outside = []
    for name, t in named_tensors(obj):
        count += 1
        storage = t.untyped_storage()
        ptr, n = storage.data_ptr(), storage.nbytes()
        if n < max(min_bytes, 1) or t.device.type != "cpu":
            continue
        if ptr not in seen:
            ok = any(lo <= ptr and ptr + n <= hi for lo, hi in ranges)
            seen[ptr] = ok
            total += n
            inside += n if ok else 0
        if not seen[ptr]:
            outside.append(name)
    return Residency(count, len(seen), total, inside, outside)


@dataclass
class Memory:
    """One process's memory, in bytes: private (USS), proportional (PSS), and the store's share."""

    pid: int
    uss: int
    pss: int
    rss: int
    store_pss: int  # PSS of object store mappings only
    store_rss: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def memory(pid: int | None = None) -> Memory:
    """USS and PSS from psutil, plus per-mapping PSS of the object store from smaps."""
    pid = os.getpid() if pid is None else pid
    full = psutil.Process(pid).memory_full_info()
    store_pss = store_rss = 0
    in_store = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                in_store = "plasma" in line
            elif in_store and first == "Pss:":
                store_pss += int(line.split()[1]) * 1024
            elif in_store and first == "Rss:":
                store_rss += int(line.split()[1]) * 1024
    return Memory(pid, full.uss, full.pss, full.rss, store_pss, store_rss)


def store_bytes_by_node() -> dict[str, int]:
    """Bytes used in each alive node's object store, keyed by node id (asks each raylet)."""
    import ray
    from ray._private.internal_api import node_stats

    used = {}
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        reply = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
        used[node["NodeID"]] = int(reply.store_stats.object_store_bytes_used)
    return used


def store_bytes() -> int:
    """Bytes used in the object stores of all alive nodes."""
    return sum(store_bytes_by_node().values())


def settled_store_bytes_by_node(quiet_s: float = 2.0, timeout_s: float = 15.0) -> dict[str, int]:
    """Per-node store bytes once no node's value has moved for ``quiet_s``.

    Frees reach the raylets asynchronously (seconds on a loaded machine): a baseline
    taken in the middle of one would hide growth, or a leak of the same size.
    """
    import gc
    import time

    gc.collect()
    deadline = time.monotonic() + timeout_s
    last = store_bytes_by_node()
    quiet_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - quiet_since < quiet_s:
        time.sleep(0.25)
        now = store_bytes_by_node()
        if now != last:
            last, quiet_since = now, time.monotonic()
    return last


def settled_store_bytes(quiet_s: float = 2.0, timeout_s: float = 15.0) -> int:
    """Bytes in all object stores once pending frees are done (see :func:`settled_store_bytes_by_node`)."""
    return sum(settled_store_bytes_by_node(quiet_s, timeout_s).values())


def wait_store_bytes(ok: Callable[[int], bool], timeout_s: float = 20.0) -> int:
    """Poll the stores' total bytes until ``ok(total)`` holds or the time is up; return the last total."""
    import gc
    import time

    gc.collect()
    deadline = time.monotonic() + timeout_s
    value = store_bytes()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.25)
        gc.collect()
        value = store_bytes()
    return value
