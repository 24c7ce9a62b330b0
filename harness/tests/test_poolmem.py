"""The pool-memory formula on fabricated smaps data: every file counted once, private copies once per actor.

Actors map libtorch and the object store's file; a copying implementation adds a private
copy to each; a checkpoint file that only the pool maps counts once whichever actors still
map it. No process is read: ``/proc/PID/smaps`` is replaced by text.
"""

from __future__ import annotations

import io

import pytest

from zcbench.harness import cells, poolmem
from zcbench.suites import pipeline, probes

KiB, MiB = 1024, 2**20


def smaps(*mappings: tuple) -> str:
    """smaps text, one mapping per (path, inode, Rss kB, Private_Clean kB, Private_Dirty kB[, Anonymous kB]).

    Anonymous defaults to Private_Dirty for an anonymous mapping and to 0 for a file mapping
    (its pages are the file's unless a copy-on-write copied them).
    """
    out = []
    for i, (path, inode, rss, clean, dirty, *anon) in enumerate(mappings):
        lo = 0x7F0000000000 + i * 0x10000000
        anonymous = anon[0] if anon else (dirty if inode == "0" else 0)
        out.append(f"{lo:x}-{lo + 0x1000000:x} r--s 00000000 00:2f {inode}    {path}")
        out += [f"Rss: {rss} kB", f"Shared_Clean: {rss - clean - dirty} kB", f"Private_Clean: {clean} kB",
                f"Private_Dirty: {dirty} kB", f"Anonymous: {anonymous} kB"]  # fmt: skip
    return "\n".join(out) + "\n"


@pytest.fixture
def fake_proc(monkeypatch):
    """``probes.memory_split(pid)`` reads the text registered for ``pid``."""
    texts: dict[int, str] = {}
    real_open = open

    def fake_open(path, *a, **kw):
        if isinstance(path, str) and path.startswith("/proc/") and path.endswith("/smaps"):
            return io.StringIO(texts[int(path.split("/")[2])])
        return real_open(path, *a, **kw)

    monkeypatch.setattr(probes, "open", fake_open, raising=False)
    return texts


LIBTORCH = ("/venv/lib/libtorch_cpu.so", "101", 120 * KiB, 0, 0)
HEAP = ("", "0", 230 * KiB, 0, 230 * KiB)  # anonymous: the actor's own runtime


def split(texts, pid, text):
    texts[pid] = text
    return probes.memory_split(pid).as_dict()


def test_files_count_once_however_many_actors_map_them(fake_proc):
    store = ("/dev/shm/plasma (deleted)", "202", 256 * KiB, 0, 0)
    splits = [split(fake_proc, pid, smaps(LIBTORCH, store, HEAP)) for pid in (1, 2, 3)]
    splits.append(split(fake_proc, 4, smaps(LIBTORCH, ("/dev/shm/plasma (deleted)", "202", 100 * KiB, 0, 0), HEAP)))
    assert splits[0] == {"private": 230 * MiB, "files": {"00:2f:101": 120 * MiB, "00:2f:202": 256 * MiB}}
    # Σ private + each file once, at the most any actor maps: 4 x 230 + 120 + 256 MiB
    assert probes.pool_total(splits) == (4 * 230 + 120 + 256) * MiB


def test_model_cost_is_one_copy_when_shared_and_n_copies_when_private(fake_proc):
    empty = [split(fake_proc, pid, smaps(LIBTORCH, HEAP)) for pid in (1, 2, 3, 4)]
    shared = [split(fake_proc, pid, smaps(LIBTORCH, ("/dev/shm/plasma (deleted)", "202", 256 * KiB, 0, 0), HEAP))
              for pid in (1, 2, 3, 4)]  # fmt: skip
    m = poolmem.pool_memory(empty, shared, 256 * MiB)
    assert m["pool_empty_bytes"] == (4 * 230 + 120) * MiB
    assert m["model_cost_bytes"] == 256 * MiB and m["model_copies"] == pytest.approx(1.0)
    private_copy = ("", "0", 256 * KiB, 0, 256 * KiB)
    copies = [split(fake_proc, pid, smaps(LIBTORCH, HEAP, private_copy)) for pid in (1, 2, 3, 4)]
    m = poolmem.pool_memory(empty, copies, 256 * MiB)
    assert m["model_copies"] == pytest.approx(4.0)
    assert m["pool_total_bytes"] == m["pool_private_bytes"] + m["pool_shared_bytes"]


def test_a_checkpoint_mapped_by_one_actor_only_still_counts_once(fake_proc):
    """The last actor alive maps the checkpoint alone (its pages are 'private clean' then): still one copy."""
    empty = [split(fake_proc, pid, smaps(LIBTORCH, HEAP)) for pid in (1, 2)]
    both = split(fake_proc, 1, smaps(LIBTORCH, ("/tmp/model.safetensors", "303", 256 * KiB, 0, 0), HEAP))
    alone = split(fake_proc, 2, smaps(LIBTORCH, ("/tmp/model.safetensors", "303", 256 * KiB, 256 * KiB, 0), HEAP))
    assert poolmem.pool_memory(empty, [both, alone], 256 * MiB)["model_copies"] == pytest.approx(1.0)


def test_copy_on_write_pages_are_private(fake_proc):
    """A write into a copy-on-write mapping of the store copies those pages: they count for the writer alone."""
    empty = [split(fake_proc, pid, smaps(LIBTORCH, HEAP)) for pid in (1, 2)]
    reader = split(fake_proc, 1, smaps(LIBTORCH, ("/dev/shm/plasma (deleted)", "202", 256 * KiB, 0, 0), HEAP))
    writer = split(fake_proc, 2, smaps(LIBTORCH, ("/dev/shm/plasma (deleted)", "202", 256 * KiB, 0, 16 * KiB, 16 * KiB), HEAP))
    assert writer["private"] == (230 + 16) * MiB and writer["files"]["00:2f:202"] == 240 * MiB
    assert poolmem.pool_memory(empty, [reader, writer], 256 * MiB)["model_cost_bytes"] == (256 + 16) * MiB


def test_store_pages_one_actor_alone_maps_are_the_stores(fake_proc):
    """One actor per node: smaps calls its store pages "private dirty" (no other process maps them), yet they
    are the store's shared memory, not a copy: only anonymous (copied) pages are private."""
    empty = [split(fake_proc, 1, smaps(LIBTORCH, HEAP))]
    alone = split(fake_proc, 1, smaps(LIBTORCH, ("/dev/shm/plasma (deleted)", "202", 256 * KiB, 0, 256 * KiB, 0), HEAP))
    assert alone["private"] == 230 * MiB and alone["files"]["00:2f:202"] == 256 * MiB
    assert poolmem.pool_memory(empty, [alone], 256 * MiB)["model_copies"] == pytest.approx(1.0)


def _memory(uss: int, split_: dict) -> dict:
    return {"uss": uss, "pss": uss + MiB, "split": split_}


def test_memory_metrics_use_the_last_sample_after_inference():
    lib, store = {"00:2f:101": 120 * MiB}, {"00:2f:202": 64 * MiB}
    reports = [
        {"pid": p, "empty": _memory(230 * MiB, {"private": 230 * MiB, "files": lib}),
         "loaded": _memory(230 * MiB, {"private": 230 * MiB, "files": lib})}
        for p in (1, 2)
    ]  # fmt: skip
    samples = [{"pid": p, "call": c, **_memory((231 + c) * MiB, {"private": (231 + c) * MiB, "files": {**lib, **store}})}
               for p in (1, 2) for c in (0, 8)]  # fmt: skip
    run = pipeline.PipelineRun(table=None, reports=reports, samples=samples, wall_s=1.0)
    m, notes = cells.memory_metrics(run, 64 * MiB)
    assert not notes
    assert m["actor_uss_infer_bytes"] == 239 * MiB  # call 8's sample, the last
    assert m["model_cost_bytes"] == (64 + 2 * 9) * MiB
    run = pipeline.PipelineRun(table=None, reports=reports, samples=samples[:2], wall_s=1.0)  # actor 2 never ran a batch
    m, notes = cells.memory_metrics(run, 64 * MiB)
    assert "pool actor(s) 2 processed no batch" in notes[0]
