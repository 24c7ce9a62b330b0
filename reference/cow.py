"""Actor side: private copy-on-write views of object-store bytes.

Ray maps its object store ``rw-s`` (shared, writable) into every worker, and numpy's
read-only flag does not stop torch from writing. So a plain zero-copy view lets one
actor's ``param.add_(1)`` change the weights of every actor on the node. Here the
same pages of the store's file are mapped a second time with ``MAP_PRIVATE``: reads
share the physical pages (still zero-copy), and a write makes a private copy of that
page in the writing process only.

The store's file is deleted from /dev/shm, so it is reopened through
``/proc/self/map_files`` (needs CAP_SYS_ADMIN, e.g. root) or, for an ordinary user,
through the store's own open descriptor in the raylet (same user, readable under
``/proc/<pid>/fd``). If neither works, the caller decides: raise, or copy.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    offset: int
    dev: int
    inode: int
    path: str


class _Pinned(np.ndarray):
    """An ndarray over a private mapping that also keeps the shared originals alive.

    The store may reuse pages of an object once nothing in the cluster holds it, and
    not-yet-read private pages still read through to the file. So every view handed
    to torch must keep the Ray object (and its ObjectRef) alive: they ride along here.
    """

    keep: object = None


def store_mappings() -> list[_Mapping]:
    """The object-store mappings of this process (lines of /proc/self/maps with 'plasma')."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "plasma" not in line:
                continue
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            found.append(
                _Mapping(start, end, int(parts[2], 16), os.makedev(major, minor), int(parts[4]), parts[5].strip())
            )
    return found


def _candidate_paths(m: _Mapping):
    yield f"/proc/self/map_files/{m.start:x}-{m.end:x}"
    # The plasma store inside the raylet keeps the file open to pass it to clients.
    pids = [os.getppid()] + [int(p) for p in os.listdir("/proc") if p.isdigit()]
    uid = os.getuid()
    for pid in dict.fromkeys(pids):
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            path = f"/proc/{pid}/fd/{fd}"
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_ino == m.inode and st.st_dev == m.dev:
                yield path


_known_paths: dict[tuple[int, int, int], str] = {}


def _open_store_file(m: _Mapping) -> int | None:
    key = (m.dev, m.inode, m.start)
    if key in _known_paths:
        fd = _open_checked(_known_paths[key], m)
        if fd is not None:
            return fd
        del _known_paths[key]
    for path in _candidate_paths(m):
        fd = _open_checked(path, m)
        if fd is not None:
            _known_paths[key] = path
            return fd
    return None


def _open_checked(path: str, m: _Mapping) -> int | None:
    """Open ``path`` read-only if it is still the store's file (descriptors get reused)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (m.dev, m.inode):
        os.close(fd)
        return None
    return fd


def private_views(arrays: list[np.ndarray], keep: object) -> list[np.ndarray] | None:
    """Copy-on-write views with the same bytes as ``arrays`` (all inside the store).

    Returns None when no private mapping can be made in this process.
    """
    if os.environ.get("ZCBENCH_DISABLE_COW") == "1":  # lets tests exercise the fallback
        return None
    addrs = [(a.__array_interface__["data"][0], a.nbytes) for a in arrays if a.nbytes]
    if not addrs:
        return [np.empty(0, np.uint8) for _ in arrays]
    lo = min(a for a, _ in addrs)
    hi = max(a + n for a, n in addrs)
    mapping = next((m for m in store_mappings() if m.start <= lo and hi <= m.end), None)
    if mapping is None:
        return None
    fd = _open_store_file(mapping)
    if fd is None:
        return None
    page = mmap.PAGESIZE
    first = (lo - mapping.start) // page * page
    base = mapping.start + first
    try:
        region = mmap.mmap(fd, hi - base, access=mmap.ACCESS_COPY, offset=mapping.offset + first)
    except OSError:
        return None
    finally:
        os.close(fd)
    pinned = np.frombuffer(region, dtype=np.uint8).view(_Pinned)
    pinned.keep = keep
    views = []
    for a in arrays:
        if not a.nbytes:
            views.append(np.empty(0, np.uint8))
            continue
        start = a.__array_interface__["data"][0] - base
        views.append(np.asarray(pinned[start : start + a.nbytes]))
    return views
