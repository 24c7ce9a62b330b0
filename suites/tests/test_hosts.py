"""Probe actors are reused across checks; these tests prove reuse hides nothing.

A reused host gives back the memory of what it loaded (so the USS growth a check measures
in it is as honest as in a fresh process), fresh hosts are fresh, a killed host is
replaced, and a check that leaks store bytes gets its hosts killed by the executor.
"""

from __future__ import annotations

import ray

from zcbench.suites import executor, hosts, models, probes, session
from zcbench.suites.contract import load_implementation, release
from zcbench.suites.registry import Check

MiB = 2**20


def test_released_hosts_are_reused_and_fresh_ones_are_new(ray_session) -> None:
    impl = load_implementation("reference")
    wrapped = impl.wrap(models.build(models.blob_case(8)))
    try:
        (first,) = hosts.load(impl, wrapped)
        hosts.release([first])
        (again,) = hosts.load(impl, wrapped)
        assert again.pid == first.pid  # the most recently used host is lent first
        (fresh,) = hosts.load(impl, wrapped, fresh=True)
        assert fresh.pid not in (first.pid, again.pid) and fresh.report["before"]["uss"] > 0
        hosts.release([again, fresh])
        assert fresh.host not in hosts.pool_for(impl).idle  # a fresh host is killed, never reused
    finally:
        release(impl, wrapped)


def test_a_reused_host_gives_back_a_private_copy(ray_session) -> None:
    """A copying implementation's 32 MiB copy leaves the host's USS when the model is dropped."""
    impl = load_implementation("naive")
    wrapped = impl.wrap(models.build(models.blob_case(32)))
    try:
        (loaded,) = hosts.load(impl, wrapped)
        grown = loaded.report["after"]["uss"] - loaded.report["before"]["uss"]
        assert grown > 30 * MiB, loaded.report
        after_drop = ray.get(loaded.host.handle.drop.remote())
        assert after_drop["uss"] - loaded.report["before"]["uss"] < 8 * MiB, (loaded.report, after_drop)
    finally:
        hosts.release([loaded])
        release(impl, wrapped)


def test_a_killed_host_is_replaced(ray_session) -> None:
    impl = load_implementation("reference")
    wrapped = impl.wrap(models.build(models.blob_case(8)))
    try:
        (loaded,) = hosts.load(impl, wrapped)
        hosts.kill([loaded])
        assert loaded.host not in hosts.pool_for(impl).idle + hosts.pool_for(impl).lent
        (other,) = hosts.load(impl, wrapped)
        assert other.pid != loaded.pid
        hosts.release([other])
    finally:
        release(impl, wrapped)


def test_hosts_that_keep_a_leak_are_killed_after_the_check(ray_session) -> None:
    """A check whose hosts keep store bytes alive: the executor waits, then kills those hosts, and the bytes come back."""
    impl = load_implementation("zcbench.suites.mutants:ReputsPerActor")
    seen: dict = {}

    def leaky(_impl) -> None:
        wrapped = impl.wrap(models.build(models.blob_case(8)))
        (loaded,) = hosts.load(impl, wrapped)  # the mutant puts its own copy from the host, and keeps it
        seen["pid"] = loaded.pid
        release(impl, wrapped)

    # Earlier tests' frees first (the executor's own runs start settled: each check ends so).
    before = probes.wait_store_bytes(lambda v: False, 2.0)
    result = executor.Executor().execute(Check("x.leaky", leaky), impl)
    assert result.status == "pass"
    assert probes.wait_store_bytes(lambda v: v <= before + 64 * 1024, 10) <= before + 64 * 1024
    pool = hosts.pool_for(impl)
    assert seen["pid"] not in [h.pid for h in pool.idle + pool.lent]


def test_nodes_start_when_a_check_first_needs_them(ray_session) -> None:
    current = session.current()
    if not current.private:
        return
    second = current.node(session.SECOND)
    assert second and second != current.node(session.HEAD)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert second in alive
    assert current.store_capacity(session.SECOND) == session.CONFORMANCE_LAYOUT[session.SECOND].store_bytes
