"""Adapter for the reference ``ModelWrapper`` (it gets no privilege: the same contract as any other)."""

from __future__ import annotations

from typing import Any

from zcbench.reference import ModelWrapper, __version__

from ..contract import Capabilities


class ReferenceImpl:
    """zcbench's reference: one copy per node, copy-on-write isolation on the CPU.

    On a GPU the weights are one copy per device shared through CUDA IPC, where pages
    cannot be copy-on-write: a write is visible to every actor on that GPU (declared).
    """

    name = "reference"
    version = __version__
    capabilities = Capabilities(cpu=True, cuda=True, task_mode=True, write_policy="cow", cuda_write_policy="shared")

    def wrap(self, obj: Any, mode: str = "actor") -> ModelWrapper:
        return ModelWrapper.from_model(obj, mode=mode)

    def load(self, wrapped: ModelWrapper, device: str = "cpu") -> Any:
        return wrapped.load(device=device)

    def release(self, wrapped: ModelWrapper) -> None:
        """Nothing to do: the weights are freed when the last reference is dropped."""
