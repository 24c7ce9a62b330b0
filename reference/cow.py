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

A fresh private mapping has no pages yet: the first forward pass would fault in every
page of the weights. :func:`prefault` maps them readable ahead of time, still shared.
"""

from __future__ import annotations

import _thread
import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Sequence
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
    with open("/proc/self/maps", "rb") as maps:
        text = maps.read().decode(errors="replace")  # one read: a worker with torch has ~2,000 lines
    for line in text.splitlines():
        if "plasma" in line:
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


_known: list[_Mapping] = []  # this process's store mappings, as last seen

#: ioctl(PROCMAP_QUERY) on /proc/self/maps (Linux 6.11+): the one mapping at an address.
_PROCMAP_QUERY = 0xC0686611  # _IOWR('f', 17, struct procmap_query)
_QUERY = struct.Struct("=9Q4I2Q")  # struct procmap_query: 104 bytes
#: The buffer the kernel writes the mapping's path into. A longer path fails (E2BIG): /proc/self/maps
#: is read instead. The type is made once here: making it costs a fresh process ~0.07 ms, in the load.
_Name = ctypes.c_char * 512


def query_mapping(addr: int) -> _Mapping | None:
    """The store mapping covering ``addr``, asked of the kernel directly; None if that is not possible.

    Reading all of /proc/self/maps costs about 0.7 ms in a worker that imported torch (700
    mappings), most of a fresh actor's load of a model of few tensors; this asks for one.
    """
    name = _Name()
    query = bytearray(_QUERY.pack(_QUERY.size, 0, addr, 0, 0, 0, 0, 0, 0, 0, 0, len(name), 0, ctypes.addressof(name), 0))
    try:
        fd = os.open("/proc/self/maps", os.O_RDONLY)
        try:
            fcntl.ioctl(fd, _PROCMAP_QUERY, query, True)
        finally:
            os.close(fd)
    except OSError:  # an older kernel (ENOTTY/EINVAL), or no mapping at addr (ENOENT)
        return None
    _, _, _, start, end, _, _, offset, inode, major, minor, *_ = _QUERY.unpack(query)
    path = name.value.decode(errors="replace")
    if "plasma" not in path:
        return None
    return _Mapping(start, end, offset, os.makedev(major, minor), inode, path)


def _mapping_of(lo: int, hi: int) -> _Mapping | None:
    """The store mapping holding ``[lo, hi)``: one remembered, else asked of the kernel, else read from /proc/self/maps."""
    global _known

    def covers(m: _Mapping | None) -> bool:
        return m is not None and m.start <= lo and hi <= m.end

    found = next((m for m in _known if covers(m)), None) or query_mapping(lo)
    if not covers(found):
        _known = store_mappings()
        found = next((m for m in _known if covers(m)), None)
    elif found not in _known:
        _known.append(found)
    return found


def private_views(arrays: Sequence[np.ndarray], keep: object) -> list[np.ndarray] | None:
    """Copy-on-write views with the same bytes as ``arrays`` (all inside the store).

    Returns None when no private mapping can be made in this process.
    """
    global _known
    if os.environ.get("ZCBENCH_DISABLE_COW") == "1":  # lets tests exercise the fallback
        return None
    views = _private_views(arrays, keep)
    if views is None and _known:  # a remembered mapping may have been replaced since: look again
        _known = []
        views = _private_views(arrays, keep)
    return views


def _private_views(arrays: Sequence[np.ndarray], keep: object) -> list[np.ndarray] | None:
    # The arrays may lie in different mappings (objects the store placed in another file):
    # one private mapping per store mapping, spanning the arrays that lie in it.
    groups: dict[_Mapping, list[int]] = {}
    for i, a in enumerate(arrays):
        if a.nbytes:
            addr = a.__array_interface__["data"][0]
            mapping = _mapping_of(addr, addr + a.nbytes)
            if mapping is None:
                return None
            groups.setdefault(mapping, []).append(i)
    views = [np.empty(0, np.uint8) for _ in arrays]
    page = mmap.PAGESIZE
    for mapping, members in groups.items():
        addrs = [arrays[i].__array_interface__["data"][0] for i in members]
        lo, hi = min(addrs), max(a + arrays[i].nbytes for a, i in zip(addrs, members))
        fd = _open_store_file(mapping)
        if fd is None:
            return None
        base = mapping.start + (lo - mapping.start) // page * page
        try:
            region = mmap.mmap(fd, hi - base, access=mmap.ACCESS_COPY, offset=mapping.offset + base - mapping.start)
        except OSError:
            return None
        finally:
            os.close(fd)
        pinned = np.frombuffer(region, dtype=np.uint8).view(_Pinned)
        pinned.keep = keep
        for i, addr in zip(members, addrs):
            views[i] = np.asarray(pinned[addr - base : addr - base + arrays[i].nbytes])
    return views


_MADV_POPULATE_READ = 22  # Linux 5.14+: fault pages in readable; private file pages stay shared


def prefault(views: Sequence[np.ndarray]) -> None:
    """Map the pages of ``views`` readable in a background thread; no page is copied.

    ``madvise(MADV_POPULATE_READ)`` through ctypes releases the GIL, so the caller's load
    returns at once; on kernels without it, one byte per page is read instead.
    (``MADV_WILLNEED`` would only read the file ahead, and the store's pages are in memory
    already: it maps nothing.)
    """
    views = [v for v in views if v.nbytes]
    if views:
        # Not threading.Thread: its start() waits until the new thread runs, milliseconds on a busy machine.
        _thread.start_new_thread(_populate, (views,))


#: Pages are populated this many bytes at a time: the kernel holds the process's mmap lock
#: while it populates, and an mmap/munmap elsewhere in the process (a large allocation in
#: the first forward pass, the next load) waits for the lock at most one chunk (~1 ms).
_CHUNK = 8 * 2**20


def _populate(views: list[np.ndarray]) -> None:
    # ``views`` keep the mapping alive while the kernel walks it.
    page = mmap.PAGESIZE
    for view in views:
        addr = view.__array_interface__["data"][0]
        end = addr + view.nbytes
        for start in range(addr // page * page, end, _CHUNK):
            if _madvise(start, min(_CHUNK, end - start), _MADV_POPULATE_READ) != 0:
                rest = view[max(0, start - addr) :]
                int(rest[::page].sum()) + int(rest[-1])  # read one byte per page (numpy drops the GIL too)
                break


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


# Loaded at import: done in the prefault thread it would hold the GIL ~0.1 ms while the load returns.
_libc = _load_libc()


def _madvise(addr: int, length: int, advice: int) -> int:
    return -1 if _libc is None else _libc.madvise(addr, length, advice)
