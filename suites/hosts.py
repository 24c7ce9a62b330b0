"""Probe actors: real Ray worker processes that load models through an implementation and answer probes.

Every check runs its model in these, never in the driver. A host is a plain Ray actor
that has imported torch and the probes; starting one costs a new Python process that
imports torch (about 2.5 CPU-seconds here), so hosts are started ahead of need and
reused: a check borrows hosts, loads, probes, and gives them back. Giving back drops
the check's models, collects garbage and returns freed heap pages to the kernel
(``malloc_trim``), so private-memory (USS) growth measured in a reused host is as honest
as in a fresh one. A host that a check kills, or that is stuck in a load, is replaced.
``fresh=True`` asks for hosts that never loaded anything (the benchmark's cold loads);
they are killed, not reused, afterwards. Every host has imported the model zoo
(:mod:`.models`), as a user's actor has imported its model's code.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import ray

from . import probes, verdicts
from .contract import Implementation, load_implementation
from .contract import release as contract_release
from .errors import InfrastructureError
from .session import HEAD, current

#: Fraction of a CPU each probe actor asks for, so many fit on a small machine.
ACTOR_CPUS = 0.01
#: Seconds a new host may take to start (a worker process importing torch); over it is infrastructure.
READY_TIMEOUT_S = 180.0
#: Seconds an implementation's load may take before the check fails it.
LOAD_TIMEOUT_S = 300.0


def actor_options(
    env: dict[str, str] | None = None,
    *,
    node: str | None = None,
    soft: bool = False,
    num_cpus: float = ACTOR_CPUS,
    num_gpus: float = 0,
    resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Ray options for a probe actor: the implementation's ``worker_env``, placement and resources.

    ``env`` must be in the worker before it imports ray (Ray reads some variables only
    then), which only ``runtime_env`` guarantees. ``node`` pins the actor to that node
    (``soft`` lets Ray place it elsewhere when the node is full).
    """
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if num_gpus:
        options["num_gpus"] = num_gpus
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    if resources:
        options["resources"] = dict(resources)
    if node:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=soft)
    return options


@ray.remote
class Host:
    """A worker process that loads wrapped models through implementations and runs probes on them."""

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}
        self.impls: dict[str, Implementation] = {}
        # The model zoo's code, imported as a user's actor has imported its model's classes: a
        # first load then times the implementation, not Python importing zcbench's models (~5 ms).
        importlib.import_module(f"{__package__}.models")
        self._freeze_runtime()

    def _freeze_runtime(self) -> None:
        # The runtime imported so far (torch, ray; transformers once a check loaded a real model)
        # is never garbage: the collector stops scanning it, so the collection before each memory
        # reading costs what the checks loaded since, not the whole runtime (a third of a second
        # once transformers is in). Only called when the host holds no model.
        gc.collect()
        gc.freeze()
        self._modules_frozen = len(sys.modules)

    def ready(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def _impl(self, spec: str) -> Implementation:
        if spec not in self.impls:
            self.impls[spec] = load_implementation(spec)
        return self.impls[spec]

    def load(self, key: str, spec: str, box: list, device: str, measure: bool = True) -> dict[str, Any]:
        """Load ``box[0]`` (boxed so Ray does not resolve an ObjectRef) and report time and memory around it.

        ``measure=False`` skips the memory readings (a garbage collection and an smaps read
        each) for checks that load many times and measure elsewhere.
        """
        impl = self._impl(spec)
        if measure:
            gc.collect()
            before = probes.memory().as_dict()
        start = time.perf_counter()
        model = impl.load(box[0], device)
        load_s = time.perf_counter() - start
        self.models[key] = model
        report = {"load_s": load_s, "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}
        if measure:
            report.update(before=before, after=probes.memory().as_dict())
        return report

    def try_load(self, spec: str, box: list, device: str) -> str | None:
        """The error text of a load, or None when it loaded (the model is dropped either way)."""
        try:
            self._impl(spec).load(box[0], device)
        except Exception as exc:  # noqa: BLE001 - any exception type is an answer; its message is judged
            return f"{type(exc).__name__}: {exc}"
        return None

    def wrap(self, spec: str, build: Callable[[], Any], mode: str = "actor") -> list:
        """Build a model here and wrap it here, as a driver on this node would (boxed result)."""
        return [self._impl(spec).wrap(build(), mode)]

    def apply(self, key: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` on the model loaded under ``key``."""
        return fn(self.models[key], *args, **kwargs)

    def residency(self, key: str, min_bytes: int = 0) -> dict[str, Any]:
        return probes.residency(self.models[key], min_bytes).as_dict()

    def memory(self) -> dict[str, int]:
        return probes.memory().as_dict()

    def usage(self) -> dict[str, int]:
        """Private memory, open descriptors and memory mappings of this process, after a collection."""
        probes.trim_heap()
        return {"uss": probes.memory().uss, "fds": len(os.listdir("/proc/self/fd")), "mappings": len(probes.mappings())}

    def reset(self) -> None:
        """Forget every model, collect garbage, give freed pages back (the pool's give-back: nothing read)."""
        self.models.clear()
        if len(sys.modules) > self._modules_frozen:
            self._freeze_runtime()
        probes.trim_heap()

    def drop(self, key: str | None = None, measure: bool = True) -> dict[str, int] | None:
        """Forget one model (all when ``key`` is None), collect garbage, give freed pages back; memory after.

        ``measure=False`` only forgets it (a check that measures later, with :meth:`usage`).
        """
        if key is None:
            self.models.clear()
        else:
            self.models.pop(key, None)
        if not measure:
            return None
        probes.trim_heap()  # a reused host must not hide a later private copy in freed pages
        return probes.memory().as_dict()


@dataclass
class HostRecord:
    """A host actor as the pool knows it."""

    handle: Any
    ready_ref: Any
    pid: int | None = None
    used: bool = False
    keys: set[str] = field(default_factory=set)


class HostPool:
    """Hosts with one worker environment on one node: started ahead of need, lent to checks, reused."""

    def __init__(self, env: dict[str, str], node: str | None):
        self.env, self.node = dict(env), node
        self.idle: list[HostRecord] = []
        self.lent: list[HostRecord] = []
        self.touched: list[HostRecord] = []  # lent since the executor last asked (see :func:`touched`)

    def _new(self) -> HostRecord:
        handle = Host.options(**actor_options(self.env, node=self.node)).remote()
        return HostRecord(handle, handle.ready.remote())

    def prestart(self, count: int) -> None:
        """Start hosts in the background until ``count`` exist (idle or lent)."""
        for _ in range(count - len(self.idle) - len(self.lent)):
            self.idle.append(self._new())

    def borrow(self, count: int, *, fresh: bool = False) -> list[HostRecord]:
        """``count`` ready hosts (never used ones when ``fresh``); InfrastructureError if they do not start.

        A host that dies while starting (a worker that failed to register on a busy machine)
        is replaced once; only a second failure, or the time-out, is an error.
        """
        self._poll()
        candidates = [h for h in self.idle if not (fresh and h.used)]
        # Most recently used first: it has already imported what the last checks needed (transformers...).
        ready = [h for h in reversed(candidates) if h.pid is not None]
        chosen = (ready + [h for h in candidates if h.pid is None])[:count]
        chosen += [self._new() for _ in range(count - len(chosen))]
        for h in chosen:
            if h in self.idle:
                self.idle.remove(h)
        self.lent += chosen
        self.touched += [h for h in chosen if h not in self.touched]
        deadline = time.monotonic() + READY_TIMEOUT_S
        for attempt in range(2):
            pending = [h for h in chosen if h.pid is None]
            failed = []
            for h in pending:
                try:
                    h.pid = ray.get(h.ready_ref, timeout=max(1.0, deadline - time.monotonic()))["pid"]
                except ray.exceptions.GetTimeoutError as exc:
                    self.kill(pending)
                    raise InfrastructureError(f"probe actors did not start within {READY_TIMEOUT_S:.0f} s") from exc
                except ray.exceptions.RayActorError as exc:
                    if attempt:
                        self.kill(pending)
                        raise InfrastructureError(f"probe actors died while starting: {verdicts.reason(exc)}") from exc
                    failed.append(h)
            for h in failed:  # replace, in place, what died while starting
                self.kill([h])
                new = self._new()
                chosen[chosen.index(h)] = new
                self.lent.append(new)
                self.touched.append(new)
            if not failed:
                break
        return chosen

    def _poll(self) -> None:
        """Note which background-started hosts are up by now (without waiting)."""
        pending = {h.ready_ref: h for h in self.idle if h.pid is None}
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in done:
            try:
                pending[ref].pid = ray.get(ref)["pid"]
            except ray.exceptions.RayError:
                self.idle.remove(pending[ref])  # it died starting; borrow starts another

    def give_back(self, hosts: list[HostRecord], *, fresh: bool = False) -> None:
        """Drop what the hosts loaded and make them available again (fresh hosts are killed instead)."""
        if fresh:
            self.kill(hosts)
            return
        refs = [h.handle.reset.remote() for h in hosts]
        alive, dead = [], []
        for h, ref in zip(hosts, refs):
            try:
                ray.get(ref, timeout=60)
                alive.append(h)
            except Exception:  # noqa: BLE001 - a host that cannot drop (dead, stuck) is replaced
                dead.append(h)
        self.kill(dead)
        for h in alive:
            h.keys.clear()
            self.lent.remove(h)
            self.idle.append(h)

    def kill(self, hosts: list[HostRecord]) -> None:
        """End the hosts' processes and wait until they are gone."""
        for h in hosts:
            try:
                ray.kill(h.handle, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        pings = [h.handle.ready.remote() for h in hosts]
        for ref in pings:
            try:
                ray.get(ref, timeout=15)
            except Exception:  # noqa: BLE001 - the expected outcome: the actor is dead
                pass
        for h in hosts:
            for group in (self.idle, self.lent):
                if h in group:
                    group.remove(h)

    def reclaim(self) -> None:
        """Give back every lent host (the executor's cleanup after each check)."""
        if self.lent:
            self.give_back(list(self.lent))

    def forget(self) -> None:
        """Drop every record without asking Ray (the cluster is being torn down)."""
        self.idle.clear()
        self.lent.clear()
        self.touched.clear()


def pool(env: dict[str, str] | None = None, node: str | None = None) -> HostPool:
    """The session's host pool for this worker environment and node (the driver's node by default)."""
    session = current()
    node = node or session.node(HEAD)
    key = (tuple(sorted((env or {}).items())), node)
    if key not in session.pools:
        session.pools[key] = HostPool(dict(env or {}), node)
    return session.pools[key]


def pool_for(impl: Implementation, role: str = HEAD) -> HostPool:
    """The pool of hosts for ``impl``'s worker environment on the node playing ``role``."""
    node = current().node(role)
    if node is None:
        raise InfrastructureError(f"the cluster has no node for role {role!r}")
    return pool(impl.capabilities.worker_env, node)


_KEYS = itertools.count()


@dataclass
class Loaded:
    """A model loaded through an implementation inside a host."""

    host: HostRecord
    pool: HostPool
    key: str
    report: dict[str, Any]
    fresh: bool = False

    @property
    def pid(self) -> int:
        return self.report["pid"]

    @property
    def node(self) -> str:
        """The node the load ran on (measured in the host)."""
        return self.report["node"]

    def apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """An ObjectRef to ``fn(model, *args, **kwargs)`` computed in the host."""
        return self.host.handle.apply.remote(self.key, fn, *args, **kwargs)

    def residency(self, min_bytes: int = 0) -> Any:
        return self.host.handle.residency.remote(self.key, min_bytes)

    def memory(self) -> Any:
        return self.host.handle.memory.remote()


def load(
    impl: Implementation,
    wrapped: Any,
    count: int = 1,
    *,
    role: str = HEAD,
    node: str | None = None,
    device: str = "cpu",
    fresh: bool = False,
    timeout_s: float = LOAD_TIMEOUT_S,
) -> list[Loaded]:
    """Load ``wrapped`` in ``count`` hosts at once and wait for every load; each report holds load time and memory.

    A load that raises propagates its exception; one that takes longer than ``timeout_s``
    fails the check (its host is killed: it is stuck in the implementation's code).
    """
    p = pool(impl.capabilities.worker_env, node) if node else pool_for(impl, role)
    hosts = p.borrow(count, fresh=fresh)
    keys = [f"m{next(_KEYS)}" for _ in hosts]
    refs = [h.handle.load.remote(k, impl.spec, [wrapped], device) for h, k in zip(hosts, keys)]
    for h, k in zip(hosts, keys):
        h.keys.add(k)
        h.used = True
    try:
        reports = ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        p.kill(hosts)
        raise AssertionError(f"{impl.name}: load in a Ray actor did not finish within {timeout_s:.0f} s") from None
    return [Loaded(h, p, k, r, fresh) for h, k, r in zip(hosts, keys, reports)]


def release(loaded: list[Loaded]) -> None:
    """Drop the models and give their hosts back."""
    by_pool: dict[int, tuple[HostPool, list[HostRecord]]] = {}
    for item in loaded:
        p, hosts = by_pool.setdefault(id(item.pool), (item.pool, []))
        if item.host in p.lent and item.host not in hosts:
            hosts.append(item.host)
    for p, hosts in by_pool.values():
        fresh = any(i.fresh for i in loaded if i.pool is p)
        p.give_back(hosts, fresh=fresh)


def kill(loaded: list[Loaded]) -> None:
    """End the hosts' processes (everything they held is released) and wait until they are gone."""
    for item in loaded:
        item.pool.kill([item.host])


def borrow(impl: Implementation, count: int = 1, *, role: str = HEAD) -> list[HostRecord]:
    """Hosts for checks that drive them directly (``try_load``, ``wrap`` on another node)."""
    return pool_for(impl, role).borrow(count)


def reclaim_all() -> None:
    """Give back every host any check still holds (the executor's cleanup)."""
    for p in list(current().pools.values()):
        p.reclaim()


def forget_touched() -> None:
    """Start a new count of the hosts checks borrow (the executor calls it before each check)."""
    for p in current().pools.values():
        p.touched.clear()


def kill_touched() -> None:
    """Kill every host borrowed since :func:`forget_touched` (they may hold what a check leaked)."""
    for p in list(current().pools.values()):
        p.kill([h for h in p.touched if h in p.idle or h in p.lent])
        p.touched.clear()


def wait_for_starts(timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until every host started in the background is up (or died starting: its borrower replaces it)."""
    pending = [h.ready_ref for p in current().pools.values() for h in p.idle if h.pid is None]
    if pending:
        ray.wait(pending, num_returns=len(pending), timeout=timeout_s)
    for p in current().pools.values():
        p._poll()


def prestart(impl: Implementation, counts: dict[str, int]) -> None:
    """Start hosts for ``impl`` in the background: ``counts`` maps a node role to how many."""
    session = current()
    for role, n in counts.items():
        if session.node(role) is not None:
            pool_for(impl, role).prestart(n)


@contextmanager
def loaded(impl: Implementation, obj: Any, count: int = 1, **options: Any) -> Iterator[list[Loaded]]:
    """Wrap ``obj`` with ``impl`` and yield ``count`` hosts that loaded it; drop, give back and release after."""
    wrapped = impl.wrap(obj, "actor")
    pool_: list[Loaded] = []
    try:
        pool_ = load(impl, wrapped, count, **options)
        yield pool_
    finally:
        release(pool_)
        contract_release(impl, wrapped)
