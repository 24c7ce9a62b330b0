"""Physical evidence, read independently of what an implementation says about itself.

Where each tensor's bytes lie (inside the object store mapping or not, from
``/proc/self/maps``), how much private and proportional memory a process holds
(psutil USS/PSS and ``/proc/PID/smaps``), and how many bytes each node's object store
holds (the raylet's own stats). Never sums of RSS: RSS counts a shared page once in
every process that touches it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch

MiB = 2**20


@dataclass(frozen=True)
class Mapping:
    """One line of ``/proc/PID/maps``."""

    start: int
    end: int
    perms: str
    path: str

    @property
    def in_store(self) -> bool:
        """Part of a Ray object store: its shared-memory file or its disk-backed fallback file."""
        return "plasma" in self.path

    @property
    def in_fallback(self) -> bool:
        """Ray's disk-backed fallback file for an object that did not fit the store (in its session directory)."""
        return self.in_store and "/session_" in self.path

    @property
    def in_shared_memory(self) -> bool:
        """The object store's own memory file (normally /dev/shm), not a disk-backed fallback file."""
        return self.in_store and not self.in_fallback


def mappings(pid: int | str = "self") -> list[Mapping]:
    """Every memory mapping of a process (``/proc/PID/maps``)."""
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            lo, hi = parts[0].split("-")
            found.append(Mapping(int(lo, 16), int(hi, 16), parts[1], parts[5].strip() if len(parts) > 5 else ""))
    return found


def plasma_ranges(pid: int | str = "self", *, shared_memory_only: bool = False) -> list[tuple[int, int]]:
    """Address ranges of the object store mappings (only the /dev/shm ones with ``shared_memory_only``)."""
    return [(m.start, m.end) for m in mappings(pid) if (m.in_shared_memory if shared_memory_only else m.in_store)]


def model_bytes(obj: Any) -> int:
    """Bytes of the distinct storages of a model or pipeline (tied weights and views counted once)."""
    storages = {}
    for _, t in named_tensors(obj):
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


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
    """Check, for each CPU tensor of ``obj``, whether its storage lies inside a shared-memory object store mapping.

    Storages smaller than ``min_bytes`` are ignored (Ray inlines small objects). Ray's
    disk-backed fallback file does not count as the store: its pages are not shared memory.
    """
    ranges = plasma_ranges(shared_memory_only=True)
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


def backing_files(obj: Any, min_bytes: int = 0) -> dict[str, int]:
    """Bytes of ``obj``'s CPU storages per file their pages are mapped from (``""``: anonymous memory)."""
    maps = mappings()
    found: dict[str, int] = {}
    seen: set[int] = set()
    for _, t in named_tensors(obj):
        s = t.untyped_storage()
        ptr, n = s.data_ptr(), s.nbytes()
        if t.device.type != "cpu" or n < max(min_bytes, 1) or ptr in seen:
            continue
        seen.add(ptr)
        where = next((m.path for m in maps if m.start <= ptr < m.end), "")
        found[where] = found.get(where, 0) + n
    return found


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


def trim_heap() -> None:
    """Collect garbage and give the heap's free pages back to the kernel (glibc ``malloc_trim``).

    glibc keeps freed heap pages mapped: without this, memory a process freed still counts
    in its USS, and a private copy made later can hide in it.
    """
    import gc

    gc.collect()
    libc = _libc()
    if libc is not None:
        try:
            libc.malloc_trim(0)
        except AttributeError:  # not glibc
            pass


@functools.cache
def _libc() -> Any:
    """The C library, looked up once (``find_library`` runs ``ldconfig`` in a subprocess each time)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


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


@dataclass
class MemorySplit:
    """One process's memory split the way a pool total needs it.

    ``private``: anonymous memory only this process has (heap, a private copy of the
    weights, pages a copy-on-write mapping copied on write). ``files``: resident pages of
    each file-backed mapping that are the file's own (the object store's shared-memory file,
    a checkpoint mapped by torch.load(mmap=True) or safetensors, shared libraries), keyed by
    ``device:inode``, whether or not another process maps them right now.
    """

    private: int
    files: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def memory_split(pid: int | None = None) -> MemorySplit:
    """:class:`MemorySplit` of a process, from ``/proc/PID/smaps``."""
    pid = os.getpid() if pid is None else pid
    private, files = 0, {}
    key, fields = None, {}

    def flush() -> None:
        nonlocal private
        if key is None:  # anonymous: everything private to this process
            private += fields.get("Private_Clean:", 0) + fields.get("Private_Dirty:", 0)
        else:
            # A file mapping's anonymous pages are what a copy-on-write mapping copied on write;
            # the rest are the file's own pages. (Private_Dirty would be wrong: a store page
            # only this process maps right now is "private" to smaps, yet lives in the store.)
            copied = fields.get("Anonymous:", 0)
            private += copied
            files[key] = files.get(key, 0) + fields.get("Rss:", 0) - copied

    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                flush()
                parts = line.split()
                key = f"{parts[3]}:{parts[4]}" if len(parts) > 5 and parts[4] != "0" else None
                fields = {}
            elif first in ("Rss:", "Private_Clean:", "Private_Dirty:", "Anonymous:"):
                fields[first] = int(line.split()[1]) * 1024
    flush()
    return MemorySplit(private, {k: v for k, v in files.items() if v})


def pool_total(splits: list[MemorySplit | dict[str, Any]]) -> int:
    """Memory of a pool of processes, every shared page counted once, the same way for every implementation.

    Σ of each process's private memory, plus each file's resident pages once (at the largest
    amount any process of the pool maps: every actor of a pool runs the whole model, so they
    touch the same pages). Independent of which processes still map a file when it is read,
    and never a sum of RSS.
    """
    files: dict[str, int] = {}
    private = 0
    for s in splits:
        s = s if isinstance(s, MemorySplit) else MemorySplit(**s)
        private += s.private
        for k, v in s.files.items():
            files[k] = max(files.get(k, 0), v)
    return private + sum(files.values())


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


def wait_store_bytes(ok: Callable[[int], bool], timeout_s: float = 20.0) -> int:
    """Poll the stores' total bytes until ``ok(total)`` holds or the time is up; return the last total."""
    import gc
    import time

    gc.collect()
    deadline = time.monotonic() + timeout_s
    value = store_bytes()
    while not ok(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = store_bytes()
    return value
