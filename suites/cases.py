"""Model cases: a model (or pipeline) builder, its inputs, and how to call it.

Builders are deterministic (seeded) module-level functions, so a case can be rebuilt
anywhere and the original model's outputs computed in the driver for comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MiB = 2**20


@dataclass(frozen=True)
class ModelCase:
    """A named model with example inputs; ``method`` is what a caller invokes."""

    name: str
    build: Callable[[], Any]
    inputs: Callable[[], tuple]
    method: str = "__call__"

    def run(self, obj: Any, inputs: tuple | None = None) -> Any:
        """Call the model the way a batch job would (eval, no autograd graph)."""
        with torch.no_grad():
            return getattr(obj, self.method)(*(self.inputs() if inputs is None else inputs))


class Mixed(nn.Module):
    """A small model touching every fidelity concern at once.

    Tied embedding/head, a bfloat16 block, a channels_last conv, a non-contiguous
    (transposed) weight, a non-persistent buffer, BatchNorm running stats, LayerNorm,
    and an int64 buffer. Every storage is over 100 KiB so none is inlined by Ray.
    """

    def __init__(self, vocab: int = 4096, dim: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.block = nn.Linear(dim, dim).to(torch.bfloat16)
        self.conv = nn.Conv2d(16, 64, 3, padding=1).to(memory_format=torch.channels_last)
        self.bn = nn.BatchNorm1d(dim)
        self.proj_t = nn.Parameter(torch.randn(dim, dim).t())  # non-contiguous on purpose
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim), persistent=False)
        self.register_buffer("positions", torch.arange(32768, dtype=torch.int64))

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(self.embed(tokens))
        h = self.block(h.to(torch.bfloat16)).float() * self.scale
        h = self.bn(h.transpose(1, 2)).transpose(1, 2) @ self.proj_t
        logits = self.head(h) + self.positions[: tokens.shape[1]].float().unsqueeze(-1) * 0
        return {"logits": logits, "conv": self.conv(image)}


def build_mixed() -> nn.Module:
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():  # non-trivial running stats, so eval-mode BN matters
        model.bn.running_mean.uniform_(-0.1, 0.1)
        model.bn.running_var.uniform_(0.9, 1.1)
    return model.eval()


def mixed_inputs() -> tuple:
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 4096, (2, 16), generator=g)
    image = torch.randn(2, 16, 12, 12, generator=g).to(memory_format=torch.channels_last)
    return tokens, image


MIXED = ModelCase("mixed", build_mixed, mixed_inputs)


class Blob(nn.Module):
    """A plain MLP of a chosen size, for memory and timing measurements."""

    def __init__(self, mib: int, width: int = 1024):
        super().__init__()
        layers = max(1, (mib * MiB) // (width * width * 4))
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def build_blob(mib: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return Blob(mib).eval()


def blob_case(mib: int = 64) -> ModelCase:
    """An MLP of about ``mib`` MiB of float32 weights."""
    from functools import partial

    return ModelCase(f"mlp-{mib}mib", partial(build_blob, mib), partial(_blob_inputs, 1024))


def _blob_inputs(width: int) -> tuple:
    return (torch.randn(8, width, generator=torch.Generator().manual_seed(2)),)
