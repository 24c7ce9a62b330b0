"""Task mode: ``load`` in the driver gives a callable whose calls run as Ray tasks, zero-copy.

The model classes live at module level so tasks can import them; their weights are
over 100 KiB per storage so none is inlined by Ray.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .. import probes
from ..equality import assert_same
from ..contract import Implementation, release
from ..registry import check

MiB = 2**20


class Embedder(nn.Module):
    """A model with a public method besides ``forward``, and one that reports where its bytes lie."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.table = nn.Embedding(2048, 256)
        self.proj = nn.Linear(256, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.proj(self.table(tokens))

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.table(tokens).mean(dim=1)

    def residency_report(self) -> dict[str, Any]:
        """Where this process holds the weights, measured in the process that runs the call."""
        return {"pid": os.getpid(), **probes.residency(self, min_bytes=100 * 1024).as_dict()}


class TaskPipeline:
    """A plain-object pipeline called through a public method."""

    def __init__(self) -> None:
        torch.manual_seed(5)
        self.encoder = nn.Linear(512, 256)
        self.head = nn.Linear(256, 16)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.encoder(x))


def _tokens() -> torch.Tensor:
    return torch.randint(0, 2048, (4, 12), generator=torch.Generator().manual_seed(6))


def _load_task(impl: Implementation, original: Any) -> tuple[Any, Any]:
    wrapped = impl.wrap(original, "task")
    proxy = impl.load(wrapped, "cpu")
    assert callable(proxy), f"load of a task-mode wrapper returned a non-callable {type(proxy).__qualname__}"
    return wrapped, proxy


@check("task_mode.outputs", requires=("cpu", "task_mode"), hosts={})
def check_outputs(impl: Implementation) -> None:
    """The task-mode callable and its forwarded public methods (embed, encode) return the original's outputs."""
    model = Embedder().eval()
    tokens = _tokens()
    wrapped, proxy = _load_task(impl, model)
    try:
        assert_same(proxy(tokens), model(tokens), "task-mode model(x)")
        assert_same(proxy.embed(tokens), model.embed(tokens), "task-mode model.embed(x)")
    finally:
        release(impl, wrapped)
    pipeline = TaskPipeline()
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(7))
    wrapped, proxy = _load_task(impl, pipeline)
    try:
        assert_same(proxy(x), pipeline(x), "task-mode pipeline(x)")
        assert_same(proxy.encode(x), pipeline.encode(x), "task-mode pipeline.encode(x)")
    finally:
        release(impl, wrapped)


@check("task_mode.zero_copy", requires=("cpu", "task_mode", "zero_copy"), hosts={})
def check_zero_copy(impl: Implementation) -> dict:
    """The task that runs a call holds every weight inside the object store (measured in that task)."""
    model = Embedder().eval()
    wrapped, proxy = _load_task(impl, model)
    try:
        report = proxy.residency_report()
    finally:
        release(impl, wrapped)
    assert report["pid"] != os.getpid(), "the task-mode call ran in the driver process, not in a Ray task"
    expected = sum(p.numel() * p.element_size() for p in model.parameters() if p.numel() * p.element_size() >= 100 * 1024)
    assert report["bytes_total"] == expected, (
        f"the task saw {report['bytes_total']} bytes of weights over 100 KiB, the model has {expected}"
    )
    assert report["fraction_in_store"] == 1.0, (
        f"only {report['fraction_in_store']:.0%} of the weights lie in the object store inside the task; "
        f"outside: {report['outside'][:5]}"
    )
    return {"task_pid": report["pid"], "bytes_in_store": report["bytes_in_store"]}
