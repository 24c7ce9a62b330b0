"""Write isolation: an in-place write in one actor never reaches another process.

Actor A writes to a loaded weight through each common path (``add_``, ``copy_``,
``load_state_dict``, ``.data``, an optimizer step); actor B (loaded before the write),
actor C (loaded after all writes) and the driver's original model are then read.
Each path writes its own weight, so one pool serves every path without one path's
write contaminating another's verdict.
"""

from __future__ import annotations

from typing import Any

import ray
import torch
from torch import nn

from .. import hosts
from ..contract import release
from ..registry import SkipCheck, check

#: Write paths, each to its own 256 KiB weight (over Ray's 100 KiB inline limit).
PATHS = {
    "add_": "w_add",
    "copy_": "w_copy",
    "load_state_dict": "w_state_dict",
    "data": "w_data",
    "sgd_step": "w_sgd",
}

#: Observed classes that mean another process saw (or may see) the write.
CORRUPTING = ("corrupts-others", "raise-after-write")


class WriteTargets(nn.Module):
    """One trainable 256x256 float32 weight per write path."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        for name in PATHS.values():
            self.register_parameter(name, nn.Parameter(torch.randn(256, 256)))


def _write(model: nn.Module, path: str) -> str | None:
    """Add 1 to the path's weight through ``path``; the exception text if the write is refused."""
    name = PATHS[path]
    p = getattr(model, name)
    try:
        if path == "add_":
            with torch.no_grad():
                p.add_(1)
        elif path == "copy_":
            with torch.no_grad():
                p.copy_(p.detach() + 1)
        elif path == "load_state_dict":
            model.load_state_dict({name: p.detach() + 1}, strict=False)
        elif path == "data":
            p.data.add_(1)
        elif path == "sgd_step":
            p.grad = torch.full_like(p, -1.0)
            torch.optim.SGD([p], lr=1.0).step()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _read(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: getattr(model, n).detach().clone() for n in names}


def _classify(error: str | None, crashed: bool, a_changed: bool, others: list[str]) -> str:
    if others:
        return "corrupts-others"
    if crashed:
        return "crash"
    if error is not None:
        return "raise-after-write" if a_changed else "raise"
    return "private" if a_changed else "ignored"


def observe_writes(impl) -> dict[str, Any]:
    """Run every write path once in a fresh pool and classify what each write reached."""
    original = WriteTargets()
    expected = {n: p.detach().clone() for n, p in original.named_parameters()}
    wrapped = impl.wrap(original, "actor")
    pool: list[hosts.Loaded] = []
    rows: dict[str, dict[str, Any]] = {}
    try:
        a, b = hosts.load(impl, wrapped, 2)
        pool += [a, b]
        for path, name in PATHS.items():
            row = {"error": None, "crashed": False, "a_changed": False, "changed_in": []}
            try:
                row["error"] = ray.get(a.apply(_write, path))
                got = ray.get(a.apply(_read, [name]))[name]
                row["a_changed"] = not torch.equal(got, expected[name])
            except ray.exceptions.RayActorError as exc:
                row["crashed"], row["error"] = True, f"actor A died: {type(exc).__name__}"
                hosts.kill([a])
                (a,) = hosts.load(impl, wrapped)  # a fresh writer for the remaining paths
                pool.append(a)
            if not torch.equal(ray.get(b.apply(_read, [name]))[name], expected[name]):
                row["changed_in"].append("B")
            if not torch.equal(getattr(original, name).detach(), expected[name]):
                row["changed_in"].append("driver")
            rows[path] = row
        (c,) = hosts.load(impl, wrapped)  # loaded after every write
        pool.append(c)
        late = ray.get(c.apply(_read, list(PATHS.values())))
        for path, name in PATHS.items():
            if not torch.equal(late[name], expected[name]):
                rows[path]["changed_in"].append("C")
    finally:
        hosts.release(pool)
        release(impl, wrapped)
    classes = {p: _classify(r["error"], r["crashed"], r["a_changed"], r["changed_in"]) for p, r in rows.items()}
    return {
        "classes": classes,
        "errors": {p: r["error"] for p, r in rows.items() if r["error"]},
        "changed_in": {p: r["changed_in"] for p, r in rows.items() if r["changed_in"]},
    }


#: Observations per implementation spec: both checks below read the same experiment.
_OBSERVED: dict[str, dict[str, Any]] = {}


def observed(impl) -> dict[str, Any]:
    """The classification for ``impl``, run once per implementation spec in this process."""
    key = getattr(impl, "spec", None) or f"{type(impl).__module__}.{type(impl).__qualname__}@{id(impl)}"
    if key not in _OBSERVED:
        _OBSERVED[key] = observe_writes(impl)
    return _OBSERVED[key]


def _describe(obs: dict[str, Any], paths: list[str]) -> str:
    parts = []
    for p in paths:
        extra = []
        if p in obs["changed_in"]:
            extra.append(f"changed in {'+'.join(obs['changed_in'][p])}")
        if p in obs["errors"]:
            extra.append(obs["errors"][p][:120])
        parts.append(f"{p}={obs['classes'][p]}" + (f" ({'; '.join(extra)})" if extra else ""))
    return ", ".join(parts)


@check("isolation.classify_writes", hosts={"head": 3})
def check_classify_writes(impl) -> dict[str, Any]:
    """No in-place write (add_, copy_, load_state_dict, .data, SGD step) reaches another actor, a later actor or the driver."""
    obs = observed(impl)
    bad = [p for p, c in obs["classes"].items() if c in CORRUPTING]
    assert not bad, f"writes in actor A escaped: {_describe(obs, bad)}"
    return obs


#: Observed classes that agree with each declared write policy.
AGREES = {"cow": ("private",), "copy": ("private",), "raise": ("raise",)}


@check("isolation.declared_policy")
def check_declared_policy(impl) -> dict[str, Any]:
    """The observed effect of writes matches the declared ``write_policy`` (cow/copy: private; raise: refused; shared: visible)."""
    declared = impl.capabilities.write_policy
    if declared == "unknown":
        raise SkipCheck("the implementation declares no write_policy")
    obs = observed(impl)
    if declared == "shared":
        # The declaration warns that writes reach others: a pool where none does contradicts it.
        assert any(c == "corrupts-others" for c in obs["classes"].values()), (
            f"declared write_policy 'shared' but no write reached another process: {_describe(obs, list(obs['classes']))}"
        )
    else:
        wrong = [p for p, c in obs["classes"].items() if c not in AGREES[declared]]
        assert not wrong, f"declared write_policy {declared!r} but observed {_describe(obs, wrong)}"
    return {"declared": declared, **obs}
