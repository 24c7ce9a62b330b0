"""Adapter for the copy-per-actor baseline: every actor unpickles its own private copy of the model."""

from __future__ import annotations

from typing import Any

import ray
import torch
from ray import cloudpickle

from ..contract import Capabilities


class NaiveCopyImpl:
    """The baseline a zero-copy implementation is measured against.

    ``wrap`` cloudpickles the whole model (weights included) into one bytes object in
    the object store; ``load`` unpickles it, so each actor owns a full private copy and
    writes stay private by construction. It declares ``zero_copy`` on purpose: the
    baseline exists so the zero-copy checks run against a copying implementation and
    show it failing (each actor holds the whole model in private memory).
    """

    name = "naive"
    version = ray.__version__  # nothing of its own: it is plain Ray + cloudpickle
    capabilities = Capabilities(cpu=True, cuda=False, task_mode=False, zero_copy=True, write_policy="copy")

    def wrap(self, obj: Any, mode: str = "actor") -> ray.ObjectRef:
        if mode != "actor":
            raise ValueError(f"naive has no {mode!r} mode; only 'actor'")
        return ray.put(cloudpickle.dumps(obj))

    def load(self, wrapped: ray.ObjectRef, device: str = "cpu") -> Any:
        obj = cloudpickle.loads(ray.get(wrapped))
        if torch.device(device).type != "cpu" and isinstance(obj, torch.nn.Module):
            obj = obj.to(device)
        return obj

    def release(self, wrapped: ray.ObjectRef) -> None:
        """Nothing to do: the bytes are freed when the last reference is dropped."""
